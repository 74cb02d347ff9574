"""The row orders of expert parallelism: parallel/collectives.py's permutation that groups received rows by local
expert (source order kept), jamba/moe.py's inverse of a permutation, with which the MoE block and the
exchanges gather rows back instead of index_copy, and the padded exchange's slot fill and pick (gathers both ways)
against index_copy / index_select."""

import torch

from jamba.moe import inverse_permutation
from parallel.collectives import local_expert_order
from parallel.expert_parallel import from_slots, slot_sources, to_slots


def test_local_expert_order_groups_rows_by_expert_keeping_the_source_order():
    # 2 sources x 2 local experts: source 0 sends 2 rows to expert 0 and 1 to expert 1, source 1 sends 1 and 2
    recv_2d = torch.tensor([[2, 1], [1, 2]])
    order = local_expert_order(recv_2d, 6)
    # received rows: s0e0 s0e0 s0e1 s1e0 s1e1 s1e1 (positions 0..5) -> expert 0: 0, 1, 3; expert 1: 2, 4, 5
    assert order.tolist() == [0, 1, 3, 2, 4, 5]


def test_inverse_permutation_undoes_the_permutation():
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(1000, generator=g)
    inv = inverse_permutation(order)
    x = torch.randn(1000, 3, generator=g)
    assert torch.equal(x.index_select(0, order).index_select(0, inv), x)
    assert torch.equal(inv.index_select(0, order), torch.arange(1000))


def _slots(n=7, size=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    slot = torch.randperm(size, generator=g)[:n]  # distinct rows of the (size, H) buffer; the rest stay empty
    return slot, slot_sources(slot, size), g


def test_to_slots_and_from_slots_equal_index_copy_and_index_select_values_and_gradients():
    slot, src, g = _slots()
    x = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    ref_x = x.detach().clone().requires_grad_()
    w = torch.randn(12, 5, generator=g, dtype=torch.float64)
    out = to_slots(x, slot, src)
    ref = ref_x.new_zeros(12, 5).index_copy(0, slot, ref_x)
    assert torch.equal(out, ref)
    empty = torch.ones(12, dtype=torch.bool)
    empty[slot] = False
    assert int(empty.sum()) == 5 and not out[empty].any()  # the rows no slot names are zeros
    (out * w).sum().backward()
    (ref * w).sum().backward()
    assert torch.equal(x.grad, ref_x.grad)

    buf = torch.randn(12, 5, generator=g, dtype=torch.float64, requires_grad=True)
    ref_buf = buf.detach().clone().requires_grad_()
    v = torch.randn(7, 5, generator=g, dtype=torch.float64)
    picked = from_slots(buf, slot, src)
    assert torch.equal(picked, ref_buf.index_select(0, slot))
    (picked * v).sum().backward()
    (ref_buf.index_select(0, slot) * v).sum().backward()
    assert torch.equal(buf.grad, ref_buf.grad) and not buf.grad[empty].any()


def test_to_slots_and_from_slots_gradcheck():
    slot, src, g = _slots(seed=1)
    x = torch.randn(7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    buf = torch.randn(12, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: to_slots(t, slot, src), (x,))
    assert torch.autograd.gradcheck(lambda t: from_slots(t, slot, src), (buf,))
    assert torch.equal(from_slots(to_slots(x, slot, src), slot, src), x)  # a round trip keeps the rows
