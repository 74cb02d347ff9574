"""`LocalParams`: a ParallelStyle for modules whose forward uses raw parameters (conv1d weight,
A_log, D, dt_proj.weight through F.linear, stacked expert weights).

The parameters become DTensors with the given placements, so FSDP2, the optimizer and DCP see global
tensors. During the module's forward, forward pre/post hooks put plain local views
(`DTensor.to_local()`, differentiable) in the owning modules' `__dict__`, which attribute lookup
finds before `_parameters`; the forward then runs on local shards unchanged. FSDP2 unshards at the
decoder-layer level before this module's pre-hook runs, so the two compose.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, Placement, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle

LocalFn = Callable[[str, torch.Tensor], torch.Tensor]


def _owner(module: nn.Module, path: str) -> Tuple[nn.Module, str]:
    *mods, name = path.split(".")
    for m in mods:
        module = getattr(module, m)
    return module, name


def distribute_param(owner: nn.Module, name: str, mesh, placements: Sequence[Placement]) -> None:
    """Replace `owner.<name>` by a DTensor parameter of the same global value (meta stays meta)."""
    p = owner._parameters[name]
    if isinstance(p, DTensor):
        raise ValueError(f"parameter {name!r} of {type(owner).__name__} is already distributed")
    dt = distribute_tensor(p.data, mesh, list(placements), src_data_rank=None if p.is_meta else 0)
    owner.register_parameter(name, nn.Parameter(dt, requires_grad=p.requires_grad))


def swap_in_local(module: nn.Module, paths: Sequence[str], local_fn: Optional[LocalFn] = None) -> None:
    for path in paths:
        owner, name = _owner(module, path)
        p = owner._parameters[name]
        local = p.to_local() if isinstance(p, DTensor) else p
        owner.__dict__[name] = local_fn(path, local) if local_fn is not None else local


def swap_out_local(module: nn.Module, paths: Sequence[str]) -> None:
    for path in paths:
        owner, name = _owner(module, path)
        owner.__dict__.pop(name, None)


class LocalParams(ParallelStyle):
    """Distribute the named parameters (paths relative to the module) with the given placements and run
    the module's forward on their local shards. `local_fn(path, local)` may transform a local view
    (e.g. pick this rank's kv head out of a replicated projection)."""

    def __init__(self, placements: Dict[str, Sequence[Placement]], local_fn: Optional[LocalFn] = None,
                 mesh=None):
        super().__init__()
        self.placements, self.local_fn, self.mesh = dict(placements), local_fn, mesh
        self.input_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None  # applied to the first input

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        mesh = self.mesh if self.mesh is not None else device_mesh
        for path, placements in self.placements.items():
            owner, name = _owner(module, path)
            distribute_param(owner, name, mesh, placements)
        paths = list(self.placements)

        def pre_hook(mod, args):
            swap_in_local(mod, paths, self.local_fn)
            if self.input_fn is not None and args:
                return (self.input_fn(args[0]),) + tuple(args[1:])
            return None

        module.register_forward_pre_hook(pre_hook)
        module.register_forward_hook(lambda mod, args, out: swap_out_local(mod, paths), always_call=True)
        return module
