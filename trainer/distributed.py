"""Process-group lifecycle and the few collectives the step loop needs (scalars only).

`world_from_env()` reads torchrun's environment without creating anything, so the config can be validated
against the world size first; `init_distributed()` then creates the group (gloo on CPU, NCCL on CUDA).
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

_gloo_created = False
"""Whether this process created a gloo process group, the default one or `new_gloo_group`'s (`exit_process`)."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_from_env() -> World:
    """RANK / WORLD_SIZE / LOCAL_RANK as torchrun sets them (single process when absent)."""
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                 int(os.environ.get("LOCAL_RANK", 0)))


def resolve_device(requested: str, world: World) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            from jamba.config import ConfigError
            raise ConfigError("train.device='cuda' but torch.cuda.is_available() is False; use train.device=cpu")
        torch.cuda.set_device(world.local_rank)
        return torch.device("cuda", world.local_rank)
    return torch.device("cpu")


def init_distributed(world: World, device: torch.device, timeout_s: float = 600.0) -> bool:
    """Create the default process group when launched with WORLD_SIZE > 1; True if one was created.

    `timeout_s` (train.collective_timeout_s) bounds every collective: gloo raises after it, NCCL's watchdog
    aborts the process (TORCH_NCCL_ASYNC_ERROR_HANDLING, on by default), so a dead or stopped peer becomes
    an error (trainer/watchdog.py names the rank and the operation) instead of a hang."""
    if world.world_size <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    _default_group_timeout(timeout)
    kwargs = dict(backend=backend, timeout=timeout)
    from trainer.elastic import round_store

    store = round_store(timeout)  # after a torchrun restart: not the dead round's keys
    if store is not None:
        kwargs.update(store=store, rank=world.rank, world_size=world.world_size)
    if device.type == "cuda":
        kwargs["device_id"] = device
    init_process_group(**kwargs)
    log.info("process group: %s, rank %d of %d, collective timeout %g s", backend, world.rank, world.world_size,
             timeout_s)
    return True


def _default_group_timeout(timeout: datetime.timedelta) -> None:
    """Make `timeout` the default of every process group created later too: the device mesh's sub-groups
    (FSDP, TP, EP all-to-alls) and the checkpoint writer's group are created without a timeout, and c10d
    would give them its own default (10 min NCCL, 30 min gloo) instead of train.collective_timeout_s."""
    from torch.distributed import distributed_c10d as c10d

    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):
        if isinstance(getattr(c10d, name, None), datetime.timedelta):
            setattr(c10d, name, timeout)


def destroy_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def init_process_group(backend: str, **kwargs) -> None:
    """`dist.init_process_group(backend, **kwargs)`, noted for `exit_process` when it is gloo (scripts that set
    up their own default group, e.g. launch/bench_exchange.py, launch/bench_cp.py)."""
    global _gloo_created
    dist.init_process_group(backend, **kwargs)
    if backend == "gloo":
        _gloo_created = True


def new_gloo_group(**kwargs):
    """`dist.new_group(backend="gloo", **kwargs)`, noted for `exit_process` (e.g. the asynchronous checkpoint
    writer's group, which CUDA runs have beside NCCL's)."""
    global _gloo_created
    _gloo_created = True
    return dist.new_group(backend="gloo", **kwargs)


def exit_process(code) -> NoReturn:
    """End train.py with `code` (a `SystemExit.code`: None, an int or a message) once the run is over and its
    outputs are closed (metrics, wandb, checkpoints, the process group).

    After a gloo process group (CPU runs; CUDA runs with asynchronous checkpoints have one too) it runs the atexit
    handlers and then ends the process without the interpreter's finalization (`exit_now`). gloo's worker threads
    outlive `destroy_process_group`: gloo has no shutdown, and references inside torch keep the group alive past it
    and `gc.collect()` (DTensor sharding-propagation results hold the device mesh, whose registry holds the group;
    torch.distributed.nn.functional, when first imported after `init_process_group`, holds the default group as a
    default argument), so it is destroyed only as the interpreter finalizes. A worker that drops the last reference
    to a finished collective then needs the GIL to free its tensors; a finalizing Python ends such a thread, and
    that aborts the process: "terminate called without an active exception", SIGABRT, exit code 134, after a run
    that had finished. Two-rank CPU runs of tests/trainer's worker here: 3 aborts in about 310 runs ending normally
    (a core dump: ProcessGroupGloo::runLoop destroying an AsyncAllgatherCoalescedWork, in take_gil, while the main
    thread ran the finalizing gc), none in 450 runs ending through here. torchrun reports such an abort as a
    failure, and restarts the job under --max-restarts. Without gloo (single process; NCCL only, which
    `destroy_process_group` shuts down) this is `sys.exit`."""
    if code is None:
        code = 0
    elif not isinstance(code, int):  # sys.exit("message"): printed, exit status 1, as the interpreter does
        print(code, file=sys.stderr)
        code = 1
    if _gloo_created:
        exit_now(code)
    sys.exit(code)


def exit_now(code: int) -> NoReturn:
    """Run the atexit handlers (the run directory's lock, wandb, logging.shutdown, ...) while the interpreter
    is fully alive, flush the logs and standard streams, then `os._exit(code)`: everything a normal exit does
    except the finalization (module teardown, the last garbage collection, threads ended). Only for a
    process whose work is finished."""
    import atexit

    try:
        atexit._run_exitfuncs()  # what Py_Finalize runs first; errors in a handler are printed, not raised
    finally:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # closed or broken pipe: nothing left to save
                pass
        os._exit(code)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_scalars(values: torch.Tensor, op: str = "avg", group=None) -> torch.Tensor:
    """All-reduce a small 1-D float64 tensor (avg / sum / max); identity without a process group."""
    if not is_dist():
        return values
    if op == "avg":
        dist.all_reduce(values, op=dist.ReduceOp.SUM, group=group)
        return values / dist.get_world_size(group)
    dist.all_reduce(values, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op], group=group)
    return values


def barrier() -> None:
    if is_dist():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
