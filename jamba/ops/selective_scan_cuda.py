"""Our CUDA Mamba-1 selective scan (`csrc/selective_scan.cu`), as `torch.library` custom ops.

Same contract as mamba-ssm's `selective_scan_fn` for d_state 16 and one group of input-dependent B, C
(what Jamba uses): u, delta, z (batch, dim, L) with unit stride along L; A (dim, 16) fp32; B, C (batch, 16, L);
D, delta_bias (dim,) fp32. The kernel gives each thread one (channel, state) and runs it sequentially in time
(see the .cu file for the layout and the backward's recomputation); the block sums dB and dC over its 8
channels before its atomic adds.

Being custom ops (`jamba::selective_scan_fwd` / `_bwd`, with fake implementations and autograd), the scan
does not break `torch.compile` graphs, unlike mamba-ssm's pybind call.

The extension is compiled on first use with `torch.utils.cpp_extension.load` (nvcc needed; about a minute,
then cached under TORCH_EXTENSIONS_DIR). `fits(...)` says whether it applies to given operands;
`jamba.ops.kernels.selective_scan` dispatches to it (JAMBA_SCAN_KERNEL chooses).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from jamba.ops.selective_scan import kernel_operands

logger = logging.getLogger(__name__)

D_STATE = 16
CHANNELS_PER_BLOCK = 8
TILE, CHUNK = 16, 256  # time tile; most steps between the states the forward stores (kT, kChunk in the .cuh)
_CSRC = Path(__file__).resolve().parent / "csrc"
_SRC = _CSRC / "selective_scan.cu"
_HEADERS = [_CSRC / "selective_scan_kernels.cuh"]
_ext = None
_ext_error: Optional[BaseException] = None


def extension():
    """The compiled extension (built on first call), or None when it cannot be built here."""
    global _ext, _ext_error
    if _ext is None and _ext_error is None:
        if not torch.cuda.is_available():
            _ext_error = RuntimeError("CUDA is not available")
            return None
        try:
            from torch.utils.cpp_extension import load
            logger.info("selective_scan: compiling %s (first use; cached afterwards)", _SRC.name)
            # torch rebuilds when a listed source changes but not a header: name the build by all their contents
            digest = hashlib.sha1(b"".join(f.read_bytes() for f in [_SRC, *_HEADERS])).hexdigest()[:10]
            _ext = load(name=f"jamba_selective_scan_{digest}", sources=[str(_SRC)], verbose=False,
                        extra_cuda_cflags=["-O3", "--use_fast_math", "-std=c++17"])
        except Exception as e:  # noqa: BLE001 - no nvcc, no compiler: callers fall back
            _ext_error = e
            logger.warning("selective_scan: could not build jamba's CUDA scan (%s: %s); using mamba-ssm's",
                           type(e).__name__, str(e).splitlines()[0] if str(e) else "")
    return _ext


def build_error() -> Optional[BaseException]:
    return _ext_error


def fits(u: Tensor, A: Tensor, B: Tensor) -> bool:
    """Whether the kernel applies to these operands: CUDA, d_state 16, dim a multiple of 8, B/C shared by all
    channels ((batch, N, L)), bf16 / fp16 / fp32. (Whether it builds is `extension() is not None`.)"""
    return (u.is_cuda and u.dim() == 3 and A.shape[-1] == D_STATE and u.shape[1] % CHANNELS_PER_BLOCK == 0
            and B.dim() == 3 and u.dtype in (torch.bfloat16, torch.float16, torch.float32))


def _built_extension(u: Tensor, D: Optional[Tensor], delta_bias: Optional[Tensor]):
    """The extension, after the checks its C++ side leaves to us: D and delta_bias (dim,) fp32, contiguous,
    on u's device (the C++ side checks u, delta, A, B, C and z)."""
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and (t.dtype != torch.float32 or not t.is_contiguous() or tuple(t.shape) != (u.shape[1],)
                              or t.device != u.device):
            raise ValueError(f"selective_scan_cuda: {name} must be a contiguous fp32 ({u.shape[1]},) tensor on "
                             f"{u.device}, got {t.dtype} {tuple(t.shape)} on {t.device}; pass it through "
                             "selective_scan_cuda(...), which converts it")
    ext = extension()
    if ext is None:
        raise RuntimeError(f"selective_scan_cuda: the CUDA extension is not available ({build_error()})")
    return ext


@torch.library.custom_op("jamba::selective_scan_fwd", mutates_args=())
def _scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
              z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool,
              ck_len: int) -> Tuple[Tensor, Tensor, Tensor]:
    out, y, ck = _built_extension(u, D, delta_bias).fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, ck_len)
    return out, y, ck


@_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, ck_len):
    bsz, dim, L = u.shape
    out = u.new_empty((bsz, dim, L))
    y = u.new_empty((bsz, dim, L)) if z is not None else u.new_empty((0,))
    ck = u.new_empty((bsz, (L + ck_len - 1) // ck_len, dim, D_STATE), dtype=torch.float32)
    return out, y, ck


@torch.library.custom_op("jamba::selective_scan_bwd", mutates_args=())
def _scan_bwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
              z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool, ck_len: int,
              dout: Tensor, y: Tensor, ck: Tensor) -> List[Tensor]:
    return list(_built_extension(u, D, delta_bias).bwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, ck_len,
                                                       dout, y, ck))


@_scan_bwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, ck_len, dout, y, ck):
    bsz, dim, L = u.shape
    f32 = dict(dtype=torch.float32)
    return [u.new_empty((bsz, dim, L)), u.new_empty((bsz, dim, L)), A.new_empty(A.shape, **f32),
            u.new_empty((bsz, D_STATE, L), **f32), u.new_empty((bsz, D_STATE, L), **f32),
            u.new_empty((dim,), **f32), u.new_empty((dim,), **f32),
            u.new_empty((bsz, dim, L)) if z is not None else u.new_empty((0,))]


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, ck_len = inputs
    _, y, ck = output
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, y, ck)
    ctx.delta_softplus, ctx.ck_len = delta_softplus, ck_len


def _backward(ctx, dout, _dy, _dck):
    u, delta, A, B, C, D, z, delta_bias, y, ck = ctx.saved_tensors
    du, ddelta, dA, dB, dC, dD, dbias, dz = _scan_bwd(u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus,
                                                     ctx.ck_len, dout.contiguous(), y, ck)
    return (du, ddelta, dA, dB.to(B.dtype), dC.to(C.dtype), dD if D is not None else None,
            dz if z is not None else None, dbias if delta_bias is not None else None, None, None)


_scan_fwd.register_autograd(_backward, setup_context=_setup_context)


STATE_BUDGET_BYTES = 1 << 30  # per call: up to this, the forward keeps a state per tile (see state_interval)


def _valid_interval(every: int) -> bool:
    """Whether the kernels take this many steps between stored states (a multiple of 16, at most 256)."""
    return 0 < every <= CHUNK and every % TILE == 0


def state_interval(u: Tensor) -> int:
    """Steps between the fp32 states the forward keeps for the backward, for operands shaped like u.

    A state per 16-step tile (4 bytes per batch x channel x step: twice u in bf16) spares the backward its
    re-run of the forward: forward+backward 4.52 ms against 5.65 ms with one per 256 steps, bf16, batch 1 x
    d_inner 4096 x 16K tokens on an H100 (`python -m launch.bench_scan`). It is kept while it takes at most
    STATE_BUDGET_BYTES (1 GiB: batch x d_inner x seq up to 2^28, e.g. d_inner 4096 x 64K tokens); longer inputs
    keep one per 256 steps, 1/16 of that memory, so the longest contexts fit. JAMBA_SCAN_STATE_EVERY (a multiple
    of 16 from 16 to 256) forces an interval; `auto` (the default) applies this rule."""
    env = os.environ.get("JAMBA_SCAN_STATE_EVERY", "auto").strip().lower()
    if env != "auto":
        try:
            every = int(env)
        except ValueError:
            every = -1
        if not _valid_interval(every):
            raise ValueError(f"JAMBA_SCAN_STATE_EVERY={env!r}: expected auto or a multiple of {TILE} from {TILE} "
                             f"to {CHUNK}")
        return every
    bsz, dim, L = u.shape
    per_tile_bytes = bsz * dim * (-(-L // TILE)) * TILE * 4
    return TILE if per_tile_bytes <= STATE_BUDGET_BYTES else CHUNK


def selective_scan_cuda(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                        z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                        delta_softplus: bool = False, state_every: Optional[int] = None) -> Tensor:
    """out (batch, dim, L) in u's dtype. delta, B, C, z are cast to u's dtype; A, D, delta_bias to fp32.
    `state_every` (a multiple of 16, at most 256): steps between the fp32 states kept for the backward, which
    re-runs the forward from them unless there is one per 16-step tile; None: `state_interval(u)`."""
    if state_every is None:
        state_every = state_interval(u)
    if not _valid_interval(state_every):
        raise ValueError(f"selective_scan_cuda: state_every={state_every} must be a multiple of {TILE} "
                         f"between {TILE} and {CHUNK}")
    u, delta, A, B, C, D, z, delta_bias = kernel_operands(u, delta, A, B, C, D, z, delta_bias)
    unit = lambda t: t if t.stride(-1) == 1 else t.contiguous()  # noqa: E731
    u, delta = unit(u), unit(delta)
    B, C, A = B.contiguous(), C.contiguous(), A.contiguous()
    z = unit(z) if z is not None else None
    D = D.contiguous() if D is not None else None
    delta_bias = delta_bias.contiguous() if delta_bias is not None else None
    return _scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, state_every)[0]
