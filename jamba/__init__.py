"""Jamba-style hybrid language models (Mamba + attention + mixture-of-experts).

This package is the model only: configuration schema, layers, kernel dispatch and HF interop.
It never imports torch.distributed; parallelism is applied from the `parallel` package.
"""

from jamba.config import PRESETS, JambaConfig, get_preset

__all__ = ["JambaConfig", "PRESETS", "get_preset"]
