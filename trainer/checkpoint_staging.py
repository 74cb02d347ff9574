"""Staging for asynchronous checkpoints: the state dict is copied into CPU buffers (pinned on CUDA) that are
kept from one save to the next, and the background write reads those buffers while training goes on.

Why not torch's `DefaultStager` kept across saves: on torch 2.11 `dcp.async_save` closes the stager it is
given after the first save (its dispatch table is cleared), so the second save fails with
`KeyError: <class 'type'>` (seen on 2 H200s); a new stager per save would pin the whole state again each time
(19 s for bench-3b's 36 GB on one H200). Here the buffers come from torch's `_create_cpu_state_dict` (DTensors
keep their placements, local shards on CPU), once per state-dict layout, and each save is one non-blocking
copy per tensor and a device synchronisation.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch.distributed.checkpoint.staging import AsyncStager


def _layout(x: Any, path: Tuple = ()) -> Tuple:
    """A hashable description of the state dict's structure: (path, shape, dtype) of every tensor."""
    if isinstance(x, torch.Tensor):
        return ((path, tuple(x.shape), x.dtype),)
    if isinstance(x, dict):
        return tuple(item for k in sorted(x, key=str) for item in _layout(x[k], path + (str(k),)))
    if isinstance(x, (list, tuple)):
        return tuple(item for i, v in enumerate(x) for item in _layout(v, path + (i,)))
    return ()


class ReusedBufferStager(AsyncStager):
    """`stage(state)` -> a CPU copy of `state` in buffers reused across calls (the caller makes sure the
    previous background write has finished before the next stage)."""

    _synchronize_after_execute = False  # stage() is synchronous: nothing to wait for afterwards

    def __init__(self, pin_memory: bool):
        self.pin_memory = pin_memory
        self._buffers: Optional[Dict[str, Any]] = None
        self._layout: Optional[Tuple] = None

    def stage(self, state_dict: Dict[str, Any]) -> Dict[str, Any]:
        from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict

        layout = _layout(state_dict)
        if self._buffers is None or layout != self._layout:  # first save, or the state's layout changed
            self._buffers = _create_cpu_state_dict(state_dict, pin_memory=self.pin_memory, share_memory=False)
            self._layout = layout
        _copy_state_dict(state_dict, self._buffers, non_blocking=self.pin_memory)
        if self.pin_memory and torch.cuda.is_available():
            torch.cuda.synchronize()  # the copies are done before training changes the parameters again
        return self._buffers

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        """Called by torch after a save on some versions: the buffers stay (they are ours, reused)."""

    def release(self) -> None:
        self._buffers, self._layout = None, None
