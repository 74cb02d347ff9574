import os

import pytest
import torch

# Keep CPU tests deterministic and light on the 2-core CI machine (multi-process tests set their own).
torch.set_num_threads(1)  # tiny test tensors: thread hand-offs cost more than they save
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run with -m gpu on the GPU machine)")
    for item in items:  # the marker, not item.keywords: those also hold directory names (tests/gpu/)
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
