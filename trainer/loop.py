"""The step loop: curriculum stage -> gradient accumulation -> clip -> (skip if non-finite) -> AdamW step,
with validation, metrics, checkpoints and signal handling at step boundaries.

The loop knows nothing about the parallel layout: the model comes in already parallelised (FSDP2 / TP / EP
reduce their own gradients) and the data loaders come from `make_loader` already sharded by data-parallel
rank. Everything that decides a step's numbers (params, optimizer state, step, data position, RNG) is in
the checkpoint, so a resumed run reproduces the uninterrupted one bit for bit on CPU.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from jamba.log_once import LogOnce
from jamba.loss import IGNORE_INDEX
from trainer.checkpoint import EXIT_PREEMPTED, CheckpointManager, reseed_after_move, set_rng_state
from trainer.config import RunConfig
from trainer.curriculum import Curriculum, Stage
from trainer.data_resume import data_layout, resume_loader_state
from trainer.distributed import World, all_reduce_scalars
from trainer.metrics import (DATA_COUNTERS, GCPauses, MetricsLogger, Throughput, alloc_retries, memory_gb,
                             moe_balance)
from trainer.optim import lr_at, set_lr
from trainer.profile import profile_step, profiled
from trainer.signals import StopSignal
from trainer.watchdog import NullWatchdog

log = logging.getLogger(__name__)
_log_once = LogOnce(log)


class NonFiniteError(RuntimeError):
    """Raised after `train.max_consecutive_nonfinite` steps in a row had a non-finite loss or gradient."""


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps done (including skipped ones): the next step to run."""
    tokens: int = 0
    """Training tokens consumed, all ranks."""
    skipped: int = 0
    """Steps skipped for a non-finite loss or gradient, in total."""
    nonfinite_in_a_row: int = 0
    stage: int = 0


def clip_grad_norm(params: List[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Global gradient L2 norm (a plain tensor), clipping to max_norm when > 0.

    DTensor gradients (FSDP2, TP) on several meshes (EP experts live on their own mesh) are grouped by
    mesh: each group's norm comes from `torch.nn.utils.get_total_norm` and is made a full tensor, then the
    groups combine. With a single mesh this equals `torch.nn.utils.clip_grad_norm_`.

    The collectives (one all-reduce per mesh) must not depend on which gradients this rank has: a sharded
    (DTensor) parameter without a gradient here counts as zeros, so a rank whose share of some parameters got
    no gradient (e.g. expert-parallel experts that received no tokens) still joins their mesh's all-reduce
    instead of leaving the other ranks waiting in it. Plain tensors involve no collective and are skipped."""
    # per mesh (None: plain tensors): the gradients whose norm is taken, and the parameters to clip
    norm_grads: Dict[Any, List[torch.Tensor]] = {}
    clip_params: Dict[Any, List[torch.Tensor]] = {}
    stand_ins = 0
    for p in params:
        mesh = getattr(p, "device_mesh", None)
        key = id(mesh) if mesh is not None else None
        if p.grad is not None:
            norm_grads.setdefault(key, []).append(p.grad)
            clip_params.setdefault(key, []).append(p)
        elif mesh is not None and p.requires_grad:
            # only for the norm: the parameter keeps no gradient, so the optimizer skips this rank's shard, where
            # one process would have applied decay and momentum to a zero gradient; EP's exchanges avoid the case
            norm_grads.setdefault(key, []).append(torch.zeros_like(p))
            stand_ins += 1
    if stand_ins:
        _log_once("stand-ins", "gradient norm: %d sharded parameter(s) have no gradient on this rank; counted as "
                  "zeros so that every rank runs the same all-reduces (their optimizer update is skipped here, as "
                  "for any parameter without a gradient)", stand_ins, level=logging.WARNING)
    if not norm_grads:
        return torch.zeros(())
    sq = []
    for grads in norm_grads.values():
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        sq.append(norm.float() ** 2)
    total = torch.stack([s.to(sq[0].device) for s in sq]).sum().sqrt()
    if max_norm > 0:  # per mesh group: foreach kernels cannot mix DTensors of different meshes
        for group in clip_params.values():
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total.to(group[0].grad.device), foreach=True)
    return total


def _to(t: Optional[torch.Tensor], device: torch.device) -> Optional[torch.Tensor]:
    """Host batch tensor -> device without blocking the host: a copy from pageable memory makes CUDA wait for
    the stream (a hidden sync per micro-batch); from pinned memory it is asynchronous. Pinned blocks come from
    PyTorch's caching host allocator, so pinning a batch is one memcpy."""
    if t is None or t.device == device:
        return t
    if device.type == "cuda" and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def autocast_context(device: torch.device, precision: str):
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Trainer:
    """Runs `cfg.train.max_steps` optimizer steps. Collaborators are passed in (built by train.py):

    make_loader(stage, state) -> iterable of {"input_ids", "targets"} with state_dict()/load_state_dict()
    make_eval_loader(stage) -> iterable of held-out batches (same shapes), restarted at each validation
    grad_sync(model) -> None: optional extra gradient reduction (plain data parallelism without FSDP)
    flops_per_token(seq_len) -> float: training FLOPs per token, for MFU (with peak_tflops)
    watchdog: trainer.watchdog.Watchdog naming the phase each collective runs in (train.collective_timeout_s)

    Every rank runs the same collectives in the same order: the number of micro-batches, validation
    batches and the decisions to skip a step, stop or save are the same on all ranks (agreed through the
    step's one all-reduce, or the have-data flag in `evaluate`), never taken from one rank's own data.
    Host syncs: one per training step (the packed scalars), more only at log steps (metrics).
    """

    def __init__(self, cfg: RunConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                 curriculum: Curriculum, make_loader: Callable, make_eval_loader: Optional[Callable],
                 ckpt: CheckpointManager, metrics: MetricsLogger, world: World, device: torch.device,
                 dp_size: int, grad_sync: Optional[Callable] = None,
                 flops_per_token: Optional[Callable[[int], float]] = None, peak_tflops: Optional[float] = None,
                 watchdog: Optional[NullWatchdog] = None, dp_rank: Optional[int] = None):
        self.cfg, self.model, self.optimizer = cfg, model, optimizer
        self.curriculum, self.make_loader, self.make_eval_loader = curriculum, make_loader, make_eval_loader
        self.ckpt, self.metrics, self.world, self.device = ckpt, metrics, world, device
        self.dp_size, self.grad_sync = dp_size, grad_sync
        if dp_rank is None and dp_size != world.world_size:
            raise ValueError(f"dp_rank is needed: dp_size={dp_size} differs from the world size {world.world_size}")
        self.dp_rank = world.rank if dp_rank is None else dp_rank
        self._data_layout: Optional[Dict[str, Any]] = None  # trainer.json's data_layout (trainer/data_resume.py)
        self.flops_per_token, self.peak_tflops = flops_per_token, peak_tflops
        self.state = TrainState()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.loader = None
        self._iter = None
        self._loader_stage = -1
        self.stop: Optional[StopSignal] = None
        self.watch = watchdog if watchdog is not None else NullWatchdog()
        self.compiled = False  # the model's layers are torch.compiled (train.py sets it)
        self._evaluated_stages: set = set()  # curriculum stages validated in this process (graphs compiled)
        self._compiled = {"train": False, "eval": False}  # first forward of each kind done in this process
        self._gc_frozen: set = set()  # train.gc_freeze: (phase, stage) after which the live objects were frozen
        # auxiliary-loss-free MoE balancing (model.moe_router_bias_update_rate): biases move after each step
        rate = getattr(getattr(model, "config", None), "moe_router_bias_update_rate", 0.0)
        self._update_expert_biases = getattr(model, "update_expert_biases", None) if rate else None

    # ---- resume -------------------------------------------------------------------------------
    def restore(self) -> bool:
        """Load the newest intact checkpoint of the run directory, if any (and checkpoint.resume)."""
        with self.watch.phase("finding the checkpoint to resume from (rank 0's list, broadcast)"):
            path = self.ckpt.find_resumable() if self.cfg.checkpoint.resume else None
        if path is None:
            return False
        with self.watch.phase("checkpoint load"):
            trainer_state, rank_state = self.ckpt.load(path, self.model, self.optimizer)
        self.state = TrainState(**{k: trainer_state[k] for k in asdict(TrainState()) if k in trainer_state})
        # the checkpoint records the stage of its last step (step - 1, 0-based); the next step may start a new one
        expected = self.curriculum.stage_at(max(self.state.step - 1, 0)).index
        if expected != self.state.stage:
            log.warning("checkpoint says curriculum stage %d at step %d, the current config says stage %d; "
                        "following the config", self.state.stage, self.state.step, expected)
        if rank_state is not None:  # same number of ranks
            set_rng_state(rank_state["rng"])
        else:  # another number of ranks: no saved stream is this rank's; fresh ones, not the first steps' again
            reseed_after_move(self.cfg.train.seed, self.state.step, self.world.rank)
            if self.world.is_main:
                log.info("resumed on a world of %d (the checkpoint's: %s): RNG streams seeded from (train.seed, "
                         "step %d, rank)", self.world.world_size, trainer_state.get("world_size", "not recorded"),
                         self.state.step)
        loader_state = resume_loader_state(path, trainer_state, rank_state, self.dp_rank, self.dp_size,
                                           self.cfg.checkpoint.allow_data_change)
        # the loader's position does not depend on the row shape: a checkpoint taken at a stage switch (its
        # loader still in the previous stage) resumes at the same position with the next stage's shape
        if loader_state is not None:
            self._open_loader(self.curriculum.stage_at(self.state.step), loader_state)
        return True

    # ---- data ---------------------------------------------------------------------------------
    def _open_loader(self, stage: Stage, loader_state: Optional[dict]) -> None:
        """The first loader, a resumed one, or the next curriculum stage's shape (position carried over)."""
        if loader_state is None and self.loader is not None and hasattr(self.loader, "set_shape"):
            self.loader.set_shape(stage.seq_len, stage.micro_batch_size)
        else:
            prev = self.loader.state_dict() if self.loader is not None else None
            self.loader = self.make_loader(stage, loader_state if loader_state is not None else prev)
        self._iter = iter(self.loader)
        self._loader_stage = stage.index
        if self.world.is_main and self.state.step > 0 and loader_state is None:
            log.info("curriculum stage %d from step %d: seq_len %d, micro-batch %d, grad accumulation %d",
                     stage.index, stage.start_step, stage.seq_len, stage.micro_batch_size, stage.grad_accum)

    def _next_batch(self) -> Dict[str, torch.Tensor]:
        try:
            return next(self._iter)
        except StopIteration:  # a finite corpus: start the next epoch (every rank still takes grad_accum batches)
            log.info("data loader exhausted at step %d: starting over", self.state.step)
            self._iter = iter(self.loader)
        try:
            return next(self._iter)
        except StopIteration:
            raise RuntimeError(f"the training data of this rank (rank {self.world.rank}) gave no batch even after "
                               f"starting over at step {self.state.step}: its shard is empty; fix: add data, or "
                               f"lower data.num_workers / the data-parallel size so every reader gets documents"
                               ) from None

    def data_counters(self) -> Dict[str, int]:
        """The loaders' bad-data counters summed over data-parallel ranks, non-zero ones (a collective: every
        rank calls it at the same steps). Ranks of one data-parallel rank (TP/CP) read the same data: counted once."""
        stats = self.loader.stats() if hasattr(self.loader, "stats") else {}
        vals = torch.tensor([float(stats.get(k, 0)) for k in DATA_COUNTERS], dtype=torch.float64, device=self.device)
        vals = all_reduce_scalars(vals, "sum").cpu() / max(1, self.world.world_size // self.dp_size)
        return {k: int(round(v)) for k, v in zip(DATA_COUNTERS, vals.tolist()) if v}

    def data_state(self) -> Dict[str, Any]:
        return {"stage": self._loader_stage, "loader": self.loader.state_dict() if self.loader else None}

    # ---- one step -----------------------------------------------------------------------------
    def train_step(self, stage: Stage) -> Dict[str, Any]:
        model, cfg, watch = self.model, self.cfg, self.watch
        step = self.state.step + 1  # as logged
        model.train()
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # lm, aux, z loss summed over micro-batches
        counts = None  # expert counts summed over micro-batches, on the device (read at log steps only)
        sync_toggle = hasattr(model, "set_requires_gradient_sync")
        with watch.phase("forward and backward", step, patient=not self._compiled["train"]):
            for micro in range(stage.grad_accum):
                batch = self._next_batch()
                input_ids = _to(batch["input_ids"], self.device)  # (B, L)
                targets = _to(batch["targets"], self.device)  # (B, L) aligned: no shift in the model
                if sync_toggle:  # FSDP2: reduce-scatter gradients only on the last micro-batch
                    model.set_requires_gradient_sync(micro == stage.grad_accum - 1)
                with autocast_context(self.device, cfg.train.precision):
                    out = model(input_ids, targets=targets, doc_ids=_to(batch.get("doc_ids"), self.device))
                (out.loss / stage.grad_accum).backward()
                lm = out.lm_loss if getattr(out, "lm_loss", None) is not None else out.loss
                sums[0] += lm.detach().double()
                for i, name in ((1, "aux_loss"), (2, "z_loss")):
                    value = getattr(out, name, None)
                    if value is not None:
                        sums[i] += value.detach().double()
                ec = getattr(out, "expert_counts", None)
                if ec is not None:
                    counts = ec.detach().clone() if counts is None else counts + ec.detach()
        self._compiled["train"] = True
        if self.grad_sync is not None:
            with watch.phase("gradient all_reduce", step):
                self.grad_sync(model)
        with watch.phase("gradient norm and clipping", step):
            grad_norm = clip_grad_norm(self.params, cfg.optim.grad_clip)
        # One all-reduce and the step's one host sync: losses averaged; the stop flag and this rank's
        # non-finite-gradient flag averaged too (> 0 iff some rank raised it), so that every rank takes the
        # same decisions (skip, stop) from the same numbers.
        with watch.phase("all_reduce of the step's losses and flags", step):
            gn = grad_norm.detach().to(device=self.device, dtype=torch.float64).reshape(1)
            packed = torch.cat([sums / stage.grad_accum, (~torch.isfinite(gn)).double(), gn.new_empty(1)])
            # fill_ takes the flag as a kernel argument. `packed[4] = flag` (setitem) synchronised the host on
            # torch 2.11 (seen on H200s: a second host sync per step, tests/trainer/test_trainer_gpu.py)
            packed[4:].fill_(1.0 if self.stop is not None and self.stop.received else 0.0)
            reduced = all_reduce_scalars(packed, "avg")
            loss, aux, z, nonfinite_avg, stop_avg, grad_norm = torch.cat([reduced, gn]).cpu().tolist()
        stop_any = stop_avg > 0
        lr = lr_at(self.state.step, cfg.optim, cfg.train.max_steps)
        finite = math.isfinite(loss) and math.isfinite(grad_norm) and nonfinite_avg == 0
        if finite:
            set_lr(self.optimizer, lr)
            with watch.phase("optimizer step", step):
                self.optimizer.step()
                if counts is not None and self._update_expert_biases is not None:  # MoE balancing, no sync
                    self._update_expert_biases(counts)
            self.state.nonfinite_in_a_row = 0
        else:
            self.state.skipped += 1
            self.state.nonfinite_in_a_row += 1
            log.warning("step %d: non-finite %s (loss %s, grad norm %s): skipped (%d in a row, %d in total)",
                        self.state.step + 1, "loss" if not math.isfinite(loss) else "gradient", loss, grad_norm,
                        self.state.nonfinite_in_a_row, self.state.skipped)
        self.optimizer.zero_grad(set_to_none=True)
        if self.state.nonfinite_in_a_row >= cfg.train.max_consecutive_nonfinite:
            self.ckpt.wait()  # a background save completes (and prunes) before the newest is named
            newest = self.ckpt.latest()  # never pruned for a non-finite state: saves skip those
            raise NonFiniteError(
                f"{self.state.nonfinite_in_a_row} steps in a row (up to step {self.state.step + 1}) had a non-finite "
                f"loss or gradient (last loss {loss}, grad norm {grad_norm}); halting. Lower optim.lr, keep "
                f"optim.grad_clip > 0 or check the data, then re-run: it resumes from "
                f"{newest if newest else 'scratch (no checkpoint yet)'}. "
                f"(Limit: train.max_consecutive_nonfinite={cfg.train.max_consecutive_nonfinite})")
        self._freeze_gc(("train", stage.index))  # after the optimizer step: its states exist by now
        return {"loss": loss, "aux_loss": aux if getattr(out, "aux_loss", None) is not None else None,
                "z_loss": z if getattr(out, "z_loss", None) is not None else None,
                "grad_norm": grad_norm, "lr": lr, "finite": finite, "stop": stop_any, "expert_counts": counts}

    @torch.no_grad()
    def evaluate(self, stage: Stage) -> Optional[Dict[str, float]]:
        """Mean validation loss over up to `train.eval_batches` batches per rank, all ranks pooled.

        Validation splits give ranks different numbers of batches, and every forward pass has collectives
        (FSDP all-gathers, EP all-to-alls, TP all-reduces): a rank that stopped early would leave the others
        waiting forever (the first 2-GPU runs deadlocked here). So the ranks agree before each batch (one
        all-reduce of a have-data flag, MAX): they go on while any rank has data, and a rank whose split ran
        out runs a padding batch (its last batch again, all targets ignored) whose loss it does not count."""
        if self.make_eval_loader is None:
            return None
        step, watch = self.state.step, self.watch
        if self.compiled and stage.index not in self._evaluated_stages:  # else a silent pause of a minute on a GPU
            log.info("step %d: validation; its first batch compiles the evaluation graphs first%s", step,
                     f" (curriculum stage {stage.index}'s shapes)" if stage.index else "")
        self._evaluated_stages.add(stage.index)
        started = time.perf_counter()
        self.model.eval()
        it = iter(self.make_eval_loader(stage))
        total = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss x targets summed, targets
        flag = torch.zeros(1, dtype=torch.float64, device=self.device)
        last = None  # this rank's last real batch: the padding batch's tokens once its split ran out
        for _ in range(self.cfg.train.eval_batches):
            batch = next(it, None)
            last = batch if batch is not None else last
            with watch.phase("all_reduce of the have-data flag during evaluate", step):
                flag.fill_(0.0 if batch is None else 1.0)
                if all_reduce_scalars(flag, "max").item() == 0:
                    break
            real = batch is not None
            if not real:
                batch = self._padding_batch(stage, last)
            with watch.phase("forward during evaluate", step, patient=not self._compiled["eval"]):
                with autocast_context(self.device, self.cfg.train.precision):
                    out = self.model(_to(batch["input_ids"], self.device), targets=_to(batch["targets"], self.device),
                                     doc_ids=_to(batch.get("doc_ids"), self.device))
            self._compiled["eval"] = True
            if real:  # weighted by its targets: the split's last batch may be part padding (data/stream.py)
                lm = out.lm_loss if getattr(out, "lm_loss", None) is not None else out.loss
                n = float((batch["targets"] != IGNORE_INDEX).sum())  # a CPU tensor still: no device sync
                total[0] += lm.detach().double() * n
                total[1] += n
        self.model.train()
        with watch.phase("all_reduce of the validation loss during evaluate", step):
            total = all_reduce_scalars(total, "sum").cpu()
        self._freeze_gc(("eval", stage.index))
        if total[1] == 0:
            log.warning("validation split gave no batches: it holds fewer than seq_len + 1 = %d tokens per "
                        "data-parallel rank (%d of them); no validation loss. Fix: raise data.validation_fraction "
                        "or give data.validation_sources", stage.seq_len + 1, self.dp_size)
            return None
        val = float(total[0] / total[1])
        # tensor / context-parallel ranks of one data-parallel rank counted the same targets
        tokens = int(total[1]) // max(1, self.world.world_size // self.dp_size)
        return {"val_loss": val, "val_ppl": math.exp(min(val, 50.0)), "val_tokens": tokens,
                "val_s": round(time.perf_counter() - started, 3)}

    def _freeze_gc(self, after: Tuple[str, int]) -> None:
        """train.gc_freeze: once per fit after the first training step and the first validation of each
        curriculum stage (a stage's new shapes compile new graphs), when those graphs and the optimizer states
        exist, collect and freeze what is alive (undone when fit returns). A no-op after the first time."""
        if self.cfg.train.gc_freeze and after not in self._gc_frozen:
            self._gc_frozen.add(after)
            gc.collect()
            gc.freeze()

    def _padding_batch(self, stage: Stage, like: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
        """A batch of the stage's shape whose targets are all ignored: keeps a rank in step with the others.
        Its tokens are those of `like` (the rank's last real batch) where there is one: they route through the
        MoE layers like text, where a constant token would send all of them to the same experts (under expert
        parallelism, to one rank)."""
        if like is not None:
            return {**like, "targets": torch.full_like(like["targets"], IGNORE_INDEX)}
        shape = (stage.micro_batch_size, stage.seq_len)
        batch = {"input_ids": torch.zeros(shape, dtype=torch.long), "targets": torch.full(shape, IGNORE_INDEX)}
        if getattr(self.cfg.data, "doc_ids", False):
            batch["doc_ids"] = torch.zeros(shape, dtype=torch.long)
        return batch

    # ---- the run ------------------------------------------------------------------------------
    def fit(self) -> int:
        """Train to max_steps. Returns 0, or EXIT_PREEMPTED after a signal-triggered checkpoint."""
        cfg = self.cfg
        max_steps = cfg.train.max_steps
        if self.state.step >= max_steps:
            log.info("run already complete (step %d of %d): nothing to do", self.state.step, max_steps)
            return 0
        owned = self.stop is None  # train.py installs the handlers at start-up and passes them in
        if owned:
            self.stop = StopSignal(cfg.checkpoint.signals)
        gc_pauses = GCPauses()
        # train.gc_freeze: freeze again in this fit; unfreeze at its end unless something else had frozen first
        self._gc_frozen, unfreeze = set(), gc.get_freeze_count() == 0
        try:
            code = self._fit(max_steps, gc_pauses)
            self.ckpt.wait()  # a background save must be complete before the run counts as done
            return code
        finally:
            gc_pauses.close()
            if self._gc_frozen and unfreeze:
                gc.unfreeze()  # back to normal collection for whatever runs in this process next
            if owned:
                self.stop.restore()

    def _fit(self, max_steps: int, gc_pauses: GCPauses) -> int:
        cfg, st = self.cfg, self.state
        meter = Throughput(self.device)
        prof_step = profile_step()  # JAMBA_PROFILE_STEP: one step under the profiler (trainer/profile.py)
        while st.step < max_steps:
            stage = self.curriculum.stage_at(st.step)
            if stage.index != self._loader_stage:
                self._open_loader(stage, None)
            st.stage = stage.index
            if st.step + 1 == prof_step:
                with profiled(self.ckpt.root.parent / "profile", prof_step, self.world.rank, self.device):
                    out = self.train_step(stage)
            else:
                out = self.train_step(stage)
            step_tokens = self.curriculum.tokens_per_step(stage, self.dp_size)
            st.step += 1
            st.tokens += step_tokens
            meter.add(step_tokens)
            last = st.step == max_steps
            if st.step % cfg.logging.log_every == 0 or last or not out["finite"]:
                with self.watch.phase("waiting for the device (metrics)", st.step):
                    tps = meter.read()
                record = {"step": st.step, "tokens": st.tokens, "loss": out["loss"], "lr": out["lr"],
                          "grad_norm": out["grad_norm"], "tokens_per_s": tps, "aux_loss": out["aux_loss"],
                          "z_loss": out["z_loss"], "skipped": st.skipped, "stage": stage.index,
                          "seq_len": stage.seq_len, "mem_gb": memory_gb(self.device)}
                if self.flops_per_token is not None and self.peak_tflops:
                    record["mfu"] = (self.flops_per_token(stage.seq_len) * tps
                                     / (self.peak_tflops * 1e12 * self.world.world_size))
                record.update(moe_balance(out["expert_counts"], cfg.parallel.ep if cfg.parallel is not None else 1))
                with self.watch.phase("all_reduce of the data counters (metrics)", st.step):
                    record.update(self.data_counters())
                record.update(alloc_retries(self.device))
                record.update(gc_pauses.read())
                self.metrics.log(record)
            self.metrics.advance(st.step, out["loss"])
            if cfg.train.eval_every and (st.step % cfg.train.eval_every == 0 or last):
                val = self.evaluate(stage)
                if val is not None:
                    self.metrics.log_eval({"step": st.step, "tokens": st.tokens, **val})
            if out["stop"]:
                self.save()
                log.warning("stopped by %s at step %d after saving a checkpoint; exit code %d (re-run the same "
                            "command to resume)", self.stop.received or "a signal on another rank", st.step,
                            EXIT_PREEMPTED)
                return EXIT_PREEMPTED
            if (cfg.checkpoint.every and st.step % cfg.checkpoint.every == 0) or (last and cfg.checkpoint.save_final):
                self.save()
        return 0

    def save(self):
        if self.state.nonfinite_in_a_row:  # the last step(s) diverged: keep the newest good checkpoint newest
            log.error("step %d: no checkpoint during a non-finite streak (%d in a row); the newest stays %s",
                      self.state.step, self.state.nonfinite_in_a_row, self.ckpt.latest())
            return None
        with self.watch.phase("checkpoint save", self.state.step):
            if self._data_layout is None:  # once (a collective), for a loader with readers
                self._data_layout = data_layout(self.loader, self.world.rank, self.device)
            return self.ckpt.save(self.state.step, self.model, self.optimizer,
                                  dict(asdict(self.state), data_layout=self._data_layout), self.data_state())
