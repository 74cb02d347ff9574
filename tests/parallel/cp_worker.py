"""Multi-process worker of tests/parallel/test_context_parallel.py (torchrun, gloo, CPU, float64 by default).

Like dist_worker.py, for context-parallel layouts: every rank of a data-parallel group gets the same whole
rows (B, seq) of the global batch, with document ids; the parallelised model keeps its cp slice of the
sequence. Records the global loss of 3 AdamW steps, every full gradient after the first backward and every
full parameter at the end; rank 0 writes them to out=<file>.

Layout syntax: ParallelConfig keys plus model keys, joined by "+": "cp=2+tp=2+doc=1"
    seq=96      sequence length (default 96, not a power of two)
    doc=1       model.document_masking with random document boundaries in every row
    kv=1        model.num_key_value_heads;  heads=2  model.num_attention_heads;  rope=1  model.use_rope
    compile=aot_eager   parallel.compile.apply_compile with that backend after the layout
    broken=1    x_proj's sum over cp loses its backward sum (a wrong adjoint the test must catch)
    m2=G        Mamba-2 mixers (8 heads of 16 channels, G B/C groups) instead of Mamba-1
Usage: torchrun --nproc_per_node N tests/parallel/cp_worker.py out=<file> layouts=a,b [dtype=float64] [device=cuda]
(device=cuda: NCCL, fp32 with TF32 off, and rank 0 also writes the single-GPU references as "ref:<layout>").
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

import dist_worker
from dist_worker import SEED, STEPS, full, make_optimizer
from jamba.model import JambaForCausalLM
from parallel import ParallelConfig, ParallelDims, parallelize

MODEL_KEYS = {"kv": "num_key_value_heads", "heads": "num_attention_heads", "rope": "use_rope",
              "doc": "document_masking"}
BATCH, SEQ = 4, 96
DEVICE = torch.device("cpu")  # device=cuda on the command line: NCCL, one GPU per rank, fp32 (TF32 off)


def parse(spec: str):
    """-> (ParallelConfig kwargs, model overrides, seq_len)."""
    kw, model, seq = {}, {}, SEQ
    for item in filter(None, spec.split("+")):
        k, v = item.split("=")
        if k == "compile":  # parallel.compile.apply_compile with this backend, after the layout
            model["_compile"] = v
        elif k == "broken":  # a deliberately wrong adjoint: x_proj's sum without its backward sum
            model["_broken"] = True
        elif k == "seq":
            seq = int(v)
        elif k == "m2":  # Mamba-2 mixers: tiny's 128 channels in 8 heads of 16, v B/C groups, SSD chunks of 32
            model.update(mamba_mixer="mamba2", mamba2_head_dim=16, mamba2_n_groups=int(v), mamba2_chunk_size=32)
        elif k in MODEL_KEYS:
            model[MODEL_KEYS[k]] = bool(int(v)) if k in ("rope", "doc") else int(v)
        else:
            kw[k] = (v == "true") if v in ("true", "false") else int(v) if v.lstrip("-").isdigit() else v
    kw.setdefault("dp_shard", -1)
    return kw, model, seq


def batch(step: int, seq: int):
    """Whole rows: input_ids (B, seq), aligned targets (B, seq), doc_ids (B, seq) with ~8 documents a row."""
    ids, labels = dist_worker.global_batch(step, BATCH, seq)
    g = torch.Generator().manual_seed(500 + step)
    doc_ids = torch.cumsum((torch.rand(BATCH, seq, generator=g) < 0.08).long(), dim=1)
    return ids, labels, doc_ids


def build_model(model_overrides: dict, dtype: torch.dtype):
    torch.manual_seed(SEED)
    return JambaForCausalLM(dist_worker.model_config(**model_overrides)).to(DEVICE, dtype)


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().clone()


def reference(spec: str, dtype: torch.dtype) -> dict:
    """One process, the whole global batch."""
    _, overrides, seq = parse(spec)
    overrides.pop("_compile", None)
    overrides.pop("_broken", None)
    model = build_model(overrides, dtype)
    opt = make_optimizer(model)
    losses = []
    for i in range(STEPS):
        ids, labels, doc_ids = (t.to(DEVICE) for t in batch(i, seq))
        out = model(ids, labels=labels, doc_ids=doc_ids)
        out.loss.backward()
        losses.append(out.loss.item())
        if i == 0:
            grads = {n: _cpu(p.grad) for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
    return dict(losses=losses, grads=grads, params={n: _cpu(p) for n, p in model.named_parameters()})


def run_layout(spec: str, dtype: torch.dtype) -> dict:
    from parallel import context_parallel

    if parse(spec)[1].get("_broken"):
        backward = context_parallel._CpSum.backward
        context_parallel._CpSum.backward = staticmethod(lambda ctx, g: (g, None, None))  # each rank's own only
        try:
            return _run_layout(spec, dtype)
        finally:
            context_parallel._CpSum.backward = backward
    return _run_layout(spec, dtype)


def _run_layout(spec: str, dtype: torch.dtype) -> dict:
    kw, overrides, seq = parse(spec)
    overrides.pop("_broken", None)
    backend = overrides.pop("_compile", None)
    cfg = dist_worker.model_config(**overrides)
    dims = ParallelDims(ParallelConfig(**kw), world_size=dist.get_world_size(), model=cfg, seq_len=seq)
    dims.build_mesh(DEVICE.type)
    model = parallelize(build_model(overrides, dtype), dims)
    if backend:
        from parallel.compile import apply_compile

        apply_compile(model, backend=backend)
    seen = []  # the sequence length the decoder layers run on (L / cp when the sequence is really split)
    model.model.layers[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    opt = make_optimizer(model)
    losses, grads, rank_losses = [], None, None
    for i in range(STEPS):
        ids, labels, doc_ids = (t.to(DEVICE) for t in batch(i, seq))
        per = BATCH // dims.dp_size
        rows = slice(dims.dp_rank * per, (dims.dp_rank + 1) * per)
        out = model(ids[rows], labels=labels[rows], doc_ids=doc_ids[rows])  # whole rows; the model keeps its cp slice
        out.loss.backward()
        loss = out.loss.detach().clone()
        dist.all_reduce(loss)  # every rank's loss: the mean over all ranks is the global mean (tp ranks agree)
        losses.append((loss / dist.get_world_size()).item())
        if i == 0:
            grads = {n: _cpu(full(p.grad)) for n, p in model.named_parameters()}
            rank_losses = [torch.zeros((), device=DEVICE) for _ in range(dist.get_world_size())]
            dist.all_gather(rank_losses, out.lm_loss.detach().float())
        opt.step()
        opt.zero_grad()
    params = {n: _cpu(full(p.detach())) for n, p in model.named_parameters()}
    return dict(losses=losses, grads=grads, params=params, dims=str(dims), layer_seq_len=seen[0],
                rank_lm_losses=[t.item() for t in rank_losses])


def main() -> None:
    from torchrun_worker import finish_worker, init_worker

    global DEVICE
    args, DEVICE = init_worker(sys.argv[1:])
    # on CUDA the layouts set param_dtype=float32 (else bf16 parameters under FSDP)
    dtype = torch.float32 if DEVICE.type == "cuda" else getattr(torch, args.get("dtype", "float64"))
    specs = list(filter(None, args["layouts"].split(",")))
    result = {spec: run_layout(spec, dtype) for spec in specs}
    if DEVICE.type == "cuda" and dist.get_rank() == 0:  # references on the same kind of device (same kernels)
        result.update({f"ref:{spec}": reference(spec, dtype) for spec in specs})
    finish_worker(result, args["out"])


if __name__ == "__main__":
    from trainer.distributed import exit_now

    main()
    exit_now(0)  # results written: skip the finalization where gloo occasionally aborts (exit_process says why)
