"""torchrun worker for tests/parallel/test_ep_overlap.py: parallel.ep_exchange=overlap's experts against the plain
"sized" exchange, and the order in which it starts, waits for and computes things (gloo, float64).

Every rank holds E_local = 2 of E = 2 * ep experts and routes its own tokens; the cases give a rank no rows for
its own experts, none from or for its peers, or no rows at all, or an odd number of its own rows (uneven
halves). Each records, in order, every all-to-all it starts or runs synchronously, every wait, and every forward
and input gradient of the expert parts (numbered by forward call) and every weight gradient, with the SM carveout
in force when it ran.
Rank 0 saves {case: {"err": {...}, "events": [...]}} for every rank.
autocast=1: fp32 rows and weights under CPU autocast (bf16 matmuls) instead of float64.
"""

import contextlib
import functools
import sys

import torch
import torch.distributed as dist

from torchrun_worker import finish_worker, init_worker

from jamba import experts_split as xs
from jamba.moe import GroupedExperts
from parallel import ep_overlap
from parallel.expert_parallel import _combine, _exchange

H, I, EL = 8, 16, 2
EVENTS = []
PARTS = {}  # id of a part's saved activations -> its index in the layer's forward


def _trace_parts() -> None:
    """Record every call of the experts' part functions that parallel/ep_overlap.py makes: fwd<k> for the k-th
    forward of a layer, bwd<k> for the input gradient of that part, wgrad for a weight gradient."""
    real_forward, real_input_grad, real_weight_grad = xs.forward, xs.input_grad, xs.weight_grad
    part_of = PARTS

    def forward(*a, **k):
        k_ = len(part_of) % 3
        EVENTS.append(f"fwd{k_}{_carveout()}")
        y, saved = real_forward(*a, **k)
        part_of[id(saved)] = k_
        return y, saved

    def input_grad(saved, *a, **k):
        EVENTS.append(f"bwd{part_of[id(saved)]}{_carveout()}")
        return real_input_grad(saved, *a, **k)

    def weight_grad(*a, **k):
        EVENTS.append(f"wgrad{_carveout()}")
        return real_weight_grad(*a, **k)

    xs.forward, xs.input_grad, xs.weight_grad = forward, input_grad, weight_grad


def _carveout() -> str:
    """'/sm<N>' while the SM carveout is set (the GEMMs of this part would leave N SMs to the all-to-all)."""
    sms = torch._C._get_sm_carveout_experimental()
    return "" if sms is None else f"/sm{sms}"


class _Work:
    def __init__(self, work):
        self.work = work

    def wait(self):
        EVENTS.append("wait")
        return self.work.wait()


def _traced_all_to_all(real):
    def all_to_all_single(*args, async_op=False, **kwargs):
        EVENTS.append("start" if async_op else "sync")
        work = real(*args, async_op=async_op, **kwargs)
        return _Work(work) if async_op else work
    return all_to_all_single


def _routing(case: str, rank: int, ep: int, n: int):
    """Sorted global expert ids of this rank's n token copies."""
    g = torch.Generator().manual_seed(100 + rank)
    e = torch.randint(0, EL * ep, (n,), generator=g)
    if case == "none_for_me":  # rank 0 keeps nothing for its own experts
        e = torch.where(e < EL, e + EL, e) if rank == 0 else e
    elif case == "one_own":  # rank 0 keeps one row for its own experts: its first half is empty
        e = torch.where(e < EL, e + EL, e) if rank == 0 else e
        e[0] = 0 if rank == 0 else e[0]
    elif case == "starved":  # nobody routes to rank 1's experts: it computes nothing, yet its weights need gradients
        e = torch.where((e >= EL) & (e < 2 * EL), e - EL, e)
    elif case == "isolated":  # rank 1 routes only to its own experts, nobody else to them: it receives nothing
        e = e % EL + EL if rank == 1 else torch.where((e >= EL) & (e < 2 * EL), e - EL, e)
    return e.sort().values


# cases that change what needs a gradient (on the "odd" routing): frozen weights, rows that need none, and a loss
# whose output gradient is an expanded (stride-0) tensor
GRAD_CASES = {"frozen_down": dict(frozen=("down_proj",)), "frozen": dict(frozen=("gate_proj", "up_proj", "down_proj")),
              "x_no_grad": dict(x_grad=False), "sum_loss": dict(loss="sum")}


def run_case(case: str, ep: int, me: int, experts: GroupedExperts):
    opts = GRAD_CASES.get(case, {})
    routing = "odd" if case in GRAD_CASES else case
    n = {"odd": 13, "none_for_me": 12, "isolated": 12, "starved": 12, "one_own": 12}[routing]
    e = _routing(routing, me, ep, n)
    counts = torch.bincount(e, minlength=EL * ep)
    x0 = torch.randn(n, H, dtype=DTYPE, generator=torch.Generator().manual_seed(7 + me))
    gy = torch.randn(n, H, dtype=DTYPE, generator=torch.Generator().manual_seed(9 + me))
    group = dist.group.WORLD
    for name, p in experts.named_parameters():
        p.requires_grad_(name not in opts.get("frozen", ()))

    def grads_of(y, x):
        experts.zero_grad(set_to_none=True)
        (y.sum() if opts.get("loss") == "sum" else (y * gy).sum()).backward()
        missing = [n for n, p in experts.named_parameters() if p.requires_grad and p.grad is None]
        # a rank whose weights got no gradient leaves them out of the gradient norm's all-reduce: ranks disagree
        assert not missing, f"rank {me}, {case}: no gradient for {missing}"
        return [x.grad] + [p.grad for p in experts.parameters()]

    def leaf():
        return x0.clone().requires_grad_(opts.get("x_grad", True))

    # the plain "sized" exchange
    x = leaf()
    with AUTOCAST():
        xl, c_local, state = _exchange(x, counts, group, ep)
        y_ref = _combine(experts(xl, c_local), state, group)
    ref = [y_ref.detach()] + grads_of(y_ref, x)

    # the overlapped one, traced
    EVENTS.clear()
    PARTS.clear()
    x = leaf()
    with AUTOCAST():
        y = ep_overlap.overlapped_experts(experts, x, counts, group, ep, sms=SMS)
    EVENTS.append("|" + _carveout())  # end of forward: the carveout is restored
    got = [y.detach()] + grads_of(y, x)
    EVENTS.append("end" + _carveout())
    for p in experts.parameters():
        p.requires_grad_(True)
    names = ["y", "x.grad"] + [n for n, _ in experts.named_parameters()]
    # a gradient that one path gives and the other does not is an error of 1
    err = {k: 1.0 if (a is None) != (b is None) else 0.0 if a is None else
           ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
           for k, a, b in zip(names, got, ref)}
    dtypes = {k: (str(a.dtype), str(b.dtype)) for k, a, b in zip(names, got, ref) if a is not None and b is not None}
    return {"err": err, "events": list(EVENTS), "rows": n, "dtypes": dtypes,
            "none": [k for k, a in zip(names, got) if a is None]}


DTYPE = torch.float64
AUTOCAST = contextlib.nullcontext
SMS = 4  # SMs the parts beside an all-to-all leave free: on CPU only recorded, as matmuls there ignore it


def main(argv):
    global DTYPE, AUTOCAST
    args, _ = init_worker(argv)
    if args.get("autocast") == "1":  # fp32 rows and weights, bf16 matmuls: the experts' output is bf16
        DTYPE = torch.float32
        AUTOCAST = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16)
    ep, me = dist.get_world_size(), dist.get_rank()
    dist.all_to_all_single = _traced_all_to_all(dist.all_to_all_single)
    _trace_parts()
    torch.manual_seed(0)
    experts = GroupedExperts(EL, H, I).to(DTYPE)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(3 + me))
    result = {}
    for case in args["cases"].split(","):
        mine = run_case(case, ep, me, experts)
        every = [None] * ep
        dist.all_gather_object(every, mine)
        result[case] = every
    finish_worker(result, args["out"])


if __name__ == "__main__":
    from trainer.distributed import exit_now

    main(sys.argv[1:])
    exit_now(0)  # results written: skip the finalization where gloo occasionally aborts (exit_process says why)
