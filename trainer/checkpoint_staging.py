"""Staging for asynchronous checkpoints: the state dict is copied into CPU buffers (pinned on CUDA) that are
kept from one save to the next, and the background write reads those buffers while training goes on.

Why not torch's `DefaultStager` kept across saves: on torch 2.11 `dcp.async_save` closes the stager it is
given after the first save (its dispatch table is cleared), so the second save fails with
`KeyError: <class 'type'>` (seen on 2 H200s); a new stager per save would pin the whole state again each time.

Why not torch's `_create_cpu_state_dict` for the buffers (what this module used first): the first save of
bench-3b (36 GB of fp32 weights and AdamW states) stalled training 34-35 s on one H200, against 0.7 s for the
later ones. Per tensor it copies the DTensor to pageable CPU memory (`.to("cpu")`, a synchronous copy whose
data is thrown away), then allocates pageable memory and `.pin_memory()`s it (a second allocation in the
caching host allocator, rounded up to a power of two, and a copy). Here all buffers are views into ONE
anonymous mapping (transparent huge pages requested), faulted in by several threads and registered with CUDA
once; DTensors are rebuilt around the CPU views with their own spec, so nothing is copied until `stage`.
`python -m launch.bench_staging` measures both.
"""

from __future__ import annotations

import mmap
import os
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch.distributed.checkpoint.staging import AsyncStager

_ALIGN = 4096  # every buffer starts on a page: any dtype's view is aligned


def _layout(x: Any, path: Tuple = ()) -> Tuple:
    """A hashable description of the state dict's structure: (path, shape, dtype) of every tensor."""
    if isinstance(x, torch.Tensor):
        return ((path, tuple(x.shape), x.dtype),)
    if isinstance(x, dict):
        return tuple(item for k in sorted(x, key=str) for item in _layout(x[k], path + (str(k),)))
    if isinstance(x, (list, tuple)):
        return tuple(item for i, v in enumerate(x) for item in _layout(v, path + (i,)))
    return ()


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t._local_tensor if isinstance(t, DTensor) else t


def _map(x: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """`x` with every tensor replaced by fn(tensor); dicts, lists and tuples rebuilt, other values kept."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, dict):
        return {k: _map(v, fn) for k, v in x.items()}
    if isinstance(x, list):
        return [_map(v, fn) for v in x]
    if isinstance(x, tuple):
        return tuple(_map(v, fn) for v in x)
    return x


def _tensors(x: Any, out: List[torch.Tensor]) -> List[torch.Tensor]:
    _map(x, lambda t: out.append(t) or t)
    return out


class HostBuffer:
    """`nbytes` of CPU memory in one anonymous mapping (huge pages requested). With `pin`: its pages faulted
    in by `threads` threads (the kernel zeroes them; one thread manages a few GB/s, and cudaHostRegister alone
    would fault them in one thread), then registered with CUDA once (page-locked: device copies run at full
    PCIe speed and can be asynchronous)."""

    def __init__(self, nbytes: int, pin: bool, threads: int):
        self.nbytes = max(nbytes, 1)
        self._map = mmap.mmap(-1, self.nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                self._map.madvise(mmap.MADV_HUGEPAGE)
            except OSError:  # THP disabled: 4 KB pages, only slower
                pass
        self.tensor = torch.frombuffer(self._map, dtype=torch.uint8)
        self.pinned = False
        if pin:  # unpinned, the first copy faults the pages in: nothing to gain from doing it first
            chunk = -(-self.nbytes // threads)
            with ThreadPoolExecutor(threads) as pool:  # zero_ releases the GIL
                list(pool.map(lambda i: self.tensor[i * chunk:(i + 1) * chunk].zero_(), range(threads)))
            cudart = torch.cuda.cudart()
            err = int(cudart.cudaHostRegister(self.tensor.data_ptr(), self.nbytes, 1))  # 1: portable
            if err != 0:
                raise RuntimeError(f"pinning {self.nbytes / 2**30:.1f} GiB of checkpoint staging memory failed "
                                   f"(cudaError {err}); checkpoint.async_save=false saves without it")
            self.pinned = True
            weakref.finalize(self, cudart.cudaHostUnregister, self.tensor.data_ptr())

    def view(self, offset: int, like: torch.Tensor) -> torch.Tensor:
        n = like.numel() * like.element_size()
        return self.tensor[offset:offset + n].view(like.dtype).view(like.shape)


def cpu_buffers(state: Dict[str, Any], pin: bool, threads: int) -> Tuple[Dict[str, Any], HostBuffer]:
    """A structure like `state` whose tensors are CPU views into one HostBuffer (contents undefined until
    copied into): plain tensors by shape and dtype, DTensors as DTensors with the same spec around a CPU local
    tensor (what DCP's planner reads). Returns the structure and the buffer that owns the memory."""
    from torch.distributed.tensor import DTensor

    offsets: Dict[int, int] = {}
    total = 0
    for t in _tensors(state, []):
        loc = _local(t)
        offsets[id(t)] = total
        total += -(-loc.numel() * loc.element_size() // _ALIGN) * _ALIGN
    host = HostBuffer(total, pin, threads)

    def make(t: torch.Tensor) -> torch.Tensor:
        loc = host.view(offsets[id(t)], _local(t))
        if isinstance(t, DTensor):
            return DTensor(loc, t._spec, requires_grad=False)
        return loc

    return _map(state, make), host


def copy_into(src: Dict[str, Any], dst: Dict[str, Any], non_blocking: bool) -> None:
    """Copy every tensor of `src` into the same place of `dst` (made by cpu_buffers from the same layout)."""
    for s, d in zip(_tensors(src, []), _tensors(dst, [])):
        _local(d).copy_(_local(s), non_blocking=non_blocking)


class ReusedBufferStager(AsyncStager):
    """`stage(state)` -> a CPU copy of `state` in buffers reused across calls (the caller makes sure the
    previous background write has finished before the next stage)."""

    _synchronize_after_execute = False  # stage() is synchronous: nothing to wait for afterwards

    def __init__(self, pin_memory: bool, threads: Optional[int] = None):
        self.pin_memory = pin_memory
        self.threads = threads or min(8, os.cpu_count() or 1)
        self._buffers: Optional[Dict[str, Any]] = None
        self._host: Optional[HostBuffer] = None
        self._layout: Optional[Tuple] = None

    def stage(self, state_dict: Dict[str, Any]) -> Dict[str, Any]:
        layout = _layout(state_dict)
        if self._buffers is None or layout != self._layout:  # first save, or the state's layout changed
            self.release()
            self._buffers, self._host = cpu_buffers(state_dict, self.pin_memory, self.threads)
            self._layout = layout
        copy_into(state_dict, self._buffers, non_blocking=self.pin_memory)
        if self.pin_memory and torch.cuda.is_available():
            torch.cuda.synchronize()  # the copies are done before training changes the parameters again
        return self._buffers

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        """Called by torch after a save on some versions: the buffers stay (they are ours, reused)."""

    def release(self) -> None:
        self._buffers, self._host, self._layout = None, None, None
