"""Kernel dispatch for the Mamba mixers: fused CUDA kernels when usable, pure-PyTorch references otherwise.

| op | CUDA kernel (when importable and the tensors are on CUDA) | reference |
| --- | --- | --- |
| `selective_scan` | ours, `selective_scan_cuda.py` (d_state 16), else mamba_ssm `selective_scan_fn` | `selective_scan_ref` (chunked) |
| `causal_conv1d` | causal_conv1d `causal_conv1d_fn` | `causal_conv1d_ref` (F.conv1d) |
| `ssd_scan` | mamba_ssm Triton `mamba_chunk_scan_combined` | `ssd_chunked_ref` |

mamba_ssm's `mamba_inner_fn` is deliberately not used: it applies the dt projection before the point
where Jamba normalises dt, so it cannot express Jamba's mixer.

Which CUDA selective scan: `JAMBA_SCAN_KERNEL=auto` (default: ours where it applies and builds, else
mamba-ssm's), `jamba` (ours, an error where it cannot run) or `mamba` (mamba-ssm's).

Force the references (e.g. to compare against the kernels in tests) with `force_reference=True` on
each call, or for the whole process with the environment variable `JAMBA_FORCE_REFERENCE=1`.
Which path runs is logged once per op (logger.info).
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch

from jamba.log_once import LogOnce
from jamba.ops.causal_conv1d import causal_conv1d_ref
from jamba.ops.selective_scan import kernel_operands, selective_scan_ref
from jamba.ops.ssd import ssd_chunked_ref

logger = logging.getLogger(__name__)
_log_once = LogOnce(logger)

try:  # mamba-ssm needs its CUDA build; on CPU-only installs the import fails.
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _selective_scan_fn
except Exception as e:  # noqa: BLE001 - any failure (ImportError, missing CUDA libs) means "not available"
    _selective_scan_fn, _SCAN_ERR = None, e
try:
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as _chunk_scan_combined
except Exception as e:  # noqa: BLE001
    _chunk_scan_combined, _SSD_ERR = None, e
try:
    from causal_conv1d import causal_conv1d_fn as _causal_conv1d_fn
except Exception as e:  # noqa: BLE001
    _causal_conv1d_fn, _CONV_ERR = None, e


def reference_forced() -> bool:
    return os.environ.get("JAMBA_FORCE_REFERENCE", "0").lower() in ("1", "true", "yes")


def _use_kernel(op: str, kernel, device: torch.device, force_reference: bool, install_hint: str) -> bool:
    use = kernel is not None and device.type == "cuda" and not force_reference and not reference_forced()
    if use:
        _log_once((op, use), "%s: using the CUDA kernel (%s)", op, install_hint.split()[-1])
    elif device.type == "cuda" and kernel is None:
        _log_once((op, use), "%s: CUDA tensors but the kernel is not importable, using the slow PyTorch "
                  "reference; install it with `%s`", op, install_hint, level=logging.WARNING)
    else:
        why = "forced" if (force_reference or reference_forced()) else f"{device.type} tensors"
        _log_once((op, use), "%s: using the pure-PyTorch reference (%s)", op, why)
    return use


def kernels_available() -> dict:
    """Which fused kernels imported: {"selective_scan": bool, "causal_conv1d": bool, "ssd": bool}."""
    return {"selective_scan": _selective_scan_fn is not None, "causal_conv1d": _causal_conv1d_fn is not None,
            "ssd": _chunk_scan_combined is not None}


SCAN_KERNELS = ("auto", "jamba", "mamba")


def scan_kernel_choice() -> str:
    choice = os.environ.get("JAMBA_SCAN_KERNEL", "auto").lower()
    if choice not in SCAN_KERNELS:
        raise ValueError(f"JAMBA_SCAN_KERNEL={choice!r}: expected one of {', '.join(SCAN_KERNELS)}")
    return choice


@torch.compiler.assume_constant_result
def _jamba_scan_built() -> bool:
    # Evaluated once when torch.compile traces (not traced itself): the first call compiles the extension.
    from jamba.ops import selective_scan_cuda
    built = selective_scan_cuda.extension() is not None
    if built:
        _log_once(("selective_scan", "jamba"),
                  "selective_scan: using jamba's CUDA kernel (jamba/ops/csrc; JAMBA_SCAN_KERNEL=mamba for mamba-ssm's)")
    return built


def _use_jamba_scan(u, A, B, choice: str) -> bool:
    from jamba.ops import selective_scan_cuda as sc
    if choice == "mamba":
        return False
    fits = sc.fits(u, A, B)
    if choice == "jamba":
        if not fits:
            raise ValueError(f"JAMBA_SCAN_KERNEL=jamba: our scan needs CUDA tensors, d_state {sc.D_STATE}, d_inner a "
                             f"multiple of {sc.CHANNELS_PER_BLOCK} and shared B/C; got u {tuple(u.shape)} on "
                             f"{u.device}, A {tuple(A.shape)}, B {tuple(B.shape)}. Use JAMBA_SCAN_KERNEL=auto")
        if not _jamba_scan_built():
            raise RuntimeError(f"JAMBA_SCAN_KERNEL=jamba: the extension did not build ({sc.build_error()}); "
                               "install a CUDA toolkit (nvcc) or use JAMBA_SCAN_KERNEL=auto")
        return True
    return fits and _jamba_scan_built()


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   force_reference: bool = False):
    """Mamba-1 selective scan. u, delta, z: (B, D, L); A: (D, N) fp32; B, C: (B, N, L); D, delta_bias: (D,) fp32.
    Returns (B, D, L) in u's dtype."""
    if u.is_cuda and not force_reference and not reference_forced() and \
            _use_jamba_scan(u, A, B, scan_kernel_choice()):
        from jamba.ops.selective_scan_cuda import selective_scan_cuda
        return selective_scan_cuda(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                   delta_softplus=delta_softplus)
    if _use_kernel("selective_scan", _selective_scan_fn, u.device, force_reference, "pip install mamba-ssm"):
        u, delta, A, B, C, D, z, delta_bias = kernel_operands(u, delta, A, B, C, D, z, delta_bias)
        return _selective_scan_fn(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                  delta_softplus=delta_softplus)
    return selective_scan_ref(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus)


def causal_conv1d(x, weight, bias=None, activation: Optional[str] = "silu", force_reference: bool = False):
    """Depthwise causal conv. x: (B, D, L); weight: (D, K); bias: (D,). Returns (B, D, L)."""
    if _use_kernel("causal_conv1d", _causal_conv1d_fn, x.device, force_reference, "pip install causal-conv1d"):
        if x.stride(1) != 1 and x.stride(2) != 1:  # the kernel takes channel-first or channel-last layouts only
            x = x.contiguous()
        # Under autocast x arrives in the autocast dtype while the parameters stay fp32: cast them (differentiably).
        weight = weight.to(x.dtype)
        bias = bias.to(x.dtype) if bias is not None else None
        return _causal_conv1d_fn(x, weight, bias, activation=activation)
    return causal_conv1d_ref(x, weight, bias, activation=activation)


def ssd_scan(x, dt, A, B, C, chunk_size: int, D=None, z=None, dt_bias=None, dt_softplus=False,
             force_reference: bool = False):
    """Mamba-2 SSD. x: (B, L, H, P); dt: (B, L, H); A: (H,) fp32; B, C: (B, L, G, N); D: (H,) or (H, P);
    z: (B, L, H, P); dt_bias: (H,). Returns (B, L, H, P) in x's dtype."""
    if _use_kernel("ssd_scan", _chunk_scan_combined, x.device, force_reference, "pip install mamba-ssm"):
        return _chunk_scan_combined(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)
    return ssd_chunked_ref(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)
