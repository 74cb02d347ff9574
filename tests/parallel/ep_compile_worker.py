"""Worker of tests/parallel/test_ep_compile.py (torchrun, 2 ranks, gloo): the tiny model with expert parallelism
(ep=2) and compiled decoder layers (aot_eager) trains `steps` steps on fresh random batches, so the routing
(the all-to-all split sizes) changes every step. Rank 0 writes, to out=<file> (json), the number of graphs Dynamo
compiled by the end of each step, for each graph whether it traced an all-to-all or has symbolic (dynamic)
shapes, and the losses of the compiled and of an eager run of the same steps; then one eager step in which
EP rank 1 receives no rows at all, against one process (`zero_rows`).

    torchrun --nproc_per_node 2 tests/parallel/ep_compile_worker.py out=<file> [steps=6] [layout=ep=2]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dist_worker  # noqa: E402


def main(argv) -> None:
    args = dict(a.split("=", 1) for a in argv)
    steps = int(args.get("steps", 6))
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    compiles = []

    def counting_backend(gm, example_inputs):  # one call per graph Dynamo compiles (first time or recompile)
        from torch._dynamo.backends.debugging import aot_eager

        targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
        symbolic = any(isinstance(x, torch.SymInt) or (isinstance(x, torch.Tensor) and not all(
            isinstance(d, int) for d in x.shape)) for x in example_inputs)
        compiles.append({"all_to_all": sum("all_to_all" in t for t in targets), "symbolic_shapes": symbolic})
        return aot_eager(gm, example_inputs)

    spec = args.get("layout", "ep=2").replace(",", "+")
    if args.get("sync_free_experts", "1") == "1":
        # Like the experts' CUDA path (torch._grouped_mm with device-side offsets: no host sync and no graph
        # break inside the experts), which CPU fp32 cannot run: every row through every local expert, masked
        # to its own one (exact: the other terms are 0). The CPU default, a per-expert loop split by
        # `counts.tolist()`, graph-breaks by itself and hid the recompilations that EP caused on GPUs.
        import torch.nn.functional as F

        from jamba.moe import GroupedExperts

        def sync_free(self, x, counts, padded=False):  # x (T, H) sorted by local expert, counts (E_local,)
            # rows past the counted ones (padded=True: EP's padded exchange) match no expert: zero output
            expert = torch.searchsorted(torch.cumsum(counts, 0), torch.arange(x.shape[0]), right=True)  # (T,)
            y = x.new_zeros(x.shape)
            for e in range(self.gate_proj.shape[0]):
                h = F.silu(F.linear(x, self.gate_proj[e])) * F.linear(x, self.up_proj[e])  # (T, I)
                y = y + (expert == e).to(x.dtype)[:, None] * F.linear(h, self.down_proj[e])
            return y

        GroupedExperts.forward = sync_free
    results = {}
    for compiled in (True, False):  # the same steps compiled and eager
        model, dims = dist_worker.build(spec)
        if compiled:
            from parallel.compile import apply_compile

            apply_compile(model, backend=counting_backend)
        opt = dist_worker.make_optimizer(model)
        per_step, losses = [], []
        for i in range(steps):
            g = torch.Generator().manual_seed(1000 + i)  # new tokens each step: new routing, new split sizes
            ids = torch.randint(0, 2048, (dims.dp_size * 2, 17), generator=g)
            sl = slice(dims.dp_rank * 2, dims.dp_rank * 2 + 2)
            out = model(ids[sl, :-1], targets=ids[sl, 1:])  # aligned targets (the trainer's convention)
            out.loss.backward()
            opt.step()
            opt.zero_grad()
            per_step.append(len(compiles))
            losses.append(out.loss.item())
        results["compiled" if compiled else "eager"] = losses
        if compiled:
            results["compiles_after_step"] = per_step
    results["graphs"] = compiles
    results["zero_rows"] = zero_rows_step(spec)
    if dist.get_rank() == 0:
        Path(args["out"]).write_text(json.dumps(results))
    dist.destroy_process_group()


def _route_to_first_half(model) -> None:
    """Every token's top-2 experts become experts 0 and 1 (held by EP rank 0): a router bias of +-10 on top of
    its O(1) logits, so EP rank 1 receives no rows at all from anyone (forward and backward)."""
    for layer in model.model.layers:
        moe = getattr(layer, "feed_forward", None)
        if getattr(moe, "router", None) is not None:
            E = moe.num_experts
            bias = torch.tensor([10.0] * (E // 2) + [-10.0] * (E - E // 2))
            moe.router.register_forward_hook(lambda mod, inp, out, b=bias: out + b.to(out.dtype))


def zero_rows_step(spec: str) -> dict:
    """One forward/backward with EP rank 1 receiving zero rows, against one process on the global batch."""
    model, dims = dist_worker.build(spec)
    _route_to_first_half(model)
    local_ids, local_targets = dist_worker.local_batch(dims, 0)
    out = model(local_ids, targets=local_targets)
    out.loss.backward()
    loss = out.loss.detach().clone()
    dist.all_reduce(loss)
    got = {"loss": loss.item() / dist.get_world_size(), "counts": out.expert_counts.tolist(),
           "grads": {n: dist_worker.full(p.grad).float() for n, p in model.named_parameters()}}
    if dist.get_rank() != 0:
        return {}
    from jamba.model import JambaForCausalLM

    torch.manual_seed(dist_worker.SEED)
    ref = JambaForCausalLM(dist_worker.model_config())
    _route_to_first_half(ref)
    ids, targets = dist_worker.global_batch(0)
    ref_out = ref(ids, targets=targets)
    ref_out.loss.backward()
    errs = {n: ((got["grads"][n] - p.grad).norm() / p.grad.norm().clamp_min(1e-12)).item()
            for n, p in ref.named_parameters()}
    return {"loss": got["loss"], "ref_loss": ref_out.loss.item(), "counts": got["counts"],
            "worst_grad_err": max(errs.values()), "worst_grad": max(errs, key=errs.get)}


if __name__ == "__main__":
    from trainer.distributed import exit_now

    main(sys.argv[1:])
    exit_now(0)  # results written: skip the finalization where gloo occasionally aborts (exit_process says why)
