"""The row orders of expert parallelism: parallel/collectives.py's permutation that groups received rows by local
expert (source order kept), and jamba/moe.py's inverse of a permutation, with which the MoE block and the
exchanges gather rows back instead of index_copy."""

import torch

from jamba.moe import inverse_permutation
from parallel.collectives import local_expert_order


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
