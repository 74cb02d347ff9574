"""trainer/profile.py: JAMBA_PROFILE_STEP parsing and one profiled step on CPU (trace written, summary logged).
The CUDA-only parts (kernel timeline, host syncs) are checked on fake events in tests/launch/test_scale.py."""

import logging

import pytest
import torch

from trainer import profile


def test_profile_step_reads_the_environment(monkeypatch):
    monkeypatch.delenv(profile.ENV, raising=False)
    assert profile.profile_step() is None
    monkeypatch.setenv(profile.ENV, "12")
    assert profile.profile_step() == 12
    for bad in ("0", "x", "-3"):
        monkeypatch.setenv(profile.ENV, bad)
        with pytest.raises(ValueError, match=f"{profile.ENV}={bad!r}"):
            profile.profile_step()


def test_profiled_step_writes_a_trace_and_logs_its_top_operators(tmp_path, caplog):
    a = torch.randn(64, 64)
    with caplog.at_level(logging.INFO, logger="trainer.profile"):
        with profile.profiled(tmp_path / "profile", step=3, rank=1, device=torch.device("cpu")):
            (a @ a).sum()
    trace = tmp_path / "profile" / "step3_rank1.json"
    assert trace.stat().st_size > 0
    assert "profile of step 3 on rank 1" in caplog.text and "aten::mm" in caplog.text


def test_only_synchronising_calls_count_as_host_syncs():
    assert profile.is_sync_warning("called a synchronizing CUDA operation (Triggered internally at ...)")
    # the notice the first set_sync_debug_mode("warn") of a process gives is no sync (it was counted as one)
    assert not profile.is_sync_warning("Synchronization debug mode is a prototype feature and does not yet "
                                       "detect all synchronizing operations (Triggered internally at ...)")
