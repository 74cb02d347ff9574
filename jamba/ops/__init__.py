"""Mamba ops: pure-PyTorch references (`*_ref`, plus naive loops used as test oracles) and the
dispatch in `jamba.ops.kernels` to mamba-ssm / causal-conv1d CUDA kernels."""

from jamba.ops.causal_conv1d import causal_conv1d_ref
from jamba.ops.kernels import causal_conv1d, kernels_available, selective_scan, ssd_scan
from jamba.ops.selective_scan import selective_scan_naive, selective_scan_ref
from jamba.ops.ssd import ssd_chunked_ref, ssd_naive

__all__ = ["causal_conv1d", "causal_conv1d_ref", "kernels_available", "selective_scan", "selective_scan_naive",
           "selective_scan_ref", "ssd_chunked_ref", "ssd_naive", "ssd_scan"]
