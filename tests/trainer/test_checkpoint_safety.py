"""Checkpoints that can be trusted (issue 17 items 1-6, 11; async saves): each test reproduces a fault found by
fault injection on the stand-in loop (fast, in-process) and checks the resumed run against an uninterrupted
one bit for bit (CPU, same process, same kernels: exact equality is the right tolerance)."""

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import trainer.checkpoint as ckpt_mod
from jamba.config import ConfigError
from trainer.checkpoint import INVALID_PREFIX, MARKER, TMP_PREFIX, CheckpointManager
from trainer.checkpoint_integrity import MANIFEST, CheckpointDiskFull
from trainer.distributed import World
from trainer.metrics import REPLAYED
from trainer.loop import NonFiniteError
from trainer.run_lock import LOCK_NAME, RunDirBusy
from trainer_standins import build_trainer, read_metrics, small_run_config, train_losses

ACCUM = 2  # small_run_config: 64 tokens per step = 2 micro-batches of 4 x 8


def _names(d):
    return [p.name for p in CheckpointManager(d, small_run_config().checkpoint, World()).complete()]


def _crash_at_step(step):
    def crash(pos):
        if pos == (step - 1) * ACCUM + 1:  # the 2nd micro-batch of `step`
            raise KeyboardInterrupt("simulated crash")
    return crash


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """8 steps, checkpoints every 2 (keep 3), uninterrupted; and the same run crashed during step 7."""
    base = tmp_path_factory.mktemp("ref")
    cfg = small_run_config(max_steps=8)
    cfg.checkpoint.every, cfg.checkpoint.keep_last = 2, 3
    assert build_trainer(cfg, base / "full").fit() == 0
    with pytest.raises(KeyboardInterrupt):
        build_trainer(cfg, base / "crashed", on_batch=_crash_at_step(7)).fit()
    assert _names(base / "crashed") == ["step_000000002", "step_000000004", "step_000000006"]
    return cfg, train_losses(base / "full"), base / "crashed"


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


# ---- 1. resume=false in an existing run directory ------------------------------------------------------
def test_resume_false_in_used_run_dir_is_refused_then_overwrite_moves_it_aside(tmp_path, reference):
    cfg, ref, crashed = reference
    d = _copy(crashed, tmp_path / "run")
    before = {p.name: (p / "__0_0.distcp").read_bytes() for p in (d / "checkpoints").iterdir()}
    fresh = small_run_config(max_steps=8)
    fresh.checkpoint.every, fresh.checkpoint.keep_last, fresh.checkpoint.resume = 2, 3, False
    fresh.optim.lr = 3e-3
    with pytest.raises(ConfigError, match=r"checkpoint.resume=false .* holds an earlier run .*step_000000006.*"
                                          r"checkpoint.overwrite=true"):
        build_trainer(fresh, d)
    assert {p.name: (p / "__0_0.distcp").read_bytes() for p in (d / "checkpoints").iterdir()} == before

    # the earlier run's replayed records go along, also those of a set-aside a kill left past its commit point
    (d / REPLAYED).write_text(json.dumps({"step": 5, "loss": 1.0}) + "\n")
    (d / (REPLAYED + ".tmp")).write_text(json.dumps({"step": 5, "loss": 1.0}) + "\n"
                                         + json.dumps({"step": 7, "loss": 2.0}) + "\n")
    fresh.checkpoint.overwrite = True
    assert build_trainer(fresh, d).fit() == 0
    [prev] = [p for p in d.iterdir() if p.name.startswith("previous-")]
    assert sorted(p.name for p in (prev / "checkpoints").iterdir()) == sorted(before)  # nothing deleted
    assert (prev / "metrics.jsonl").is_file()
    assert [json.loads(x)["step"] for x in (prev / REPLAYED).read_text().splitlines()] == [5, 7]
    assert not (d / REPLAYED).exists() and not list(d.glob("*.tmp"))  # the new run redid nothing
    assert _names(d) == ["step_000000004", "step_000000006", "step_000000008"]  # the new run's, all written
    assert [r["step"] for r in read_metrics(d)] == list(range(1, 9))  # metrics.jsonl: this run only
    other = tmp_path / "fresh_dir"
    fresh.checkpoint.overwrite = False
    assert build_trainer(fresh, other).fit() == 0
    assert train_losses(d) == train_losses(other) != ref  # the new lr trained, from scratch


# ---- 2. non-finite states are never saved, the good checkpoint never pruned ----------------------------
def test_divergence_keeps_the_good_checkpoints_and_names_one_that_exists(tmp_path, reference):
    cfg, ref, crashed = reference
    d = _copy(crashed, tmp_path / "run")
    div = small_run_config(max_steps=20, max_consecutive_nonfinite=3)
    div.checkpoint.every, div.checkpoint.keep_last = 1, 2  # a save every step: the worst case
    tr = build_trainer(div, d)
    assert tr.state.step == 6
    tr.model.nan_calls = set(range(2 * ACCUM + 1, 1000))  # steps 7, 8 fine (saved), then NaN from step 9
    with pytest.raises(NonFiniteError, match=r"resumes from .*step_000000008") as e:
        tr.fit()
    newest = str(e.value).split("resumes from ")[1].split(". (Limit")[0]
    assert os.path.isdir(newest) and (torch.load(os.path.join(newest, "rank00000.pt"), weights_only=False))
    assert _names(d) == ["step_000000007", "step_000000008"]  # no save during the streak, nothing pruned for it


def test_nonfinite_parameters_are_never_saved(tmp_path, reference):
    cfg, ref, crashed = reference
    d = _copy(crashed, tmp_path / "run")
    tr = build_trainer(cfg, d)
    with torch.no_grad():
        tr.model.head.weight[0, 0] = float("nan")  # e.g. optim.eps=0: a finite loss, then NaN weights
    tr.state.step = 7
    assert tr.save() is None
    assert _names(d) == ["step_000000002", "step_000000004", "step_000000006"]


# ---- 3/4. integrity: corrupt newest checkpoint -> loud fallback to the newest intact one -----------------
def _flip(p):
    b = bytearray(p.read_bytes())
    for i in range(len(b) // 2, len(b) // 2 + 64):
        b[i] ^= 0xFF
    p.write_bytes(bytes(b))


def _one_bit(p):
    b = bytearray(p.read_bytes())
    b[len(b) // 3] ^= 0x01
    p.write_bytes(bytes(b))


CORRUPTIONS = {
    "64 bytes flipped in a shard": lambda c: _flip(c / "__0_0.distcp"),
    "one bit flipped in a shard": lambda c: _one_bit(c / "__0_0.distcp"),
    "truncated shard": lambda c: os.truncate(c / "__0_0.distcp", 1000),
    "missing shard": lambda c: (c / "__0_0.distcp").unlink(),
    "missing .metadata": lambda c: (c / ".metadata").unlink(),
    "bad trainer.json": lambda c: (c / "trainer.json").write_text('{"step": 6, "tok'),
    "missing loader/RNG file": lambda c: (c / "rank00000.pt").unlink(),
    "bit flip in the loader/RNG file": lambda c: _one_bit(c / "rank00000.pt"),
    "bad manifest": lambda c: (c / MANIFEST).write_text("{"),
    "manifest edited": lambda c: (c / MANIFEST).write_text((c / MANIFEST).read_text().replace("1", "2", 1)),
}


@pytest.mark.parametrize("how", sorted(CORRUPTIONS))
def test_corrupt_newest_checkpoint_falls_back_exactly(tmp_path, reference, how, caplog):
    cfg, ref, crashed = reference
    d = _copy(crashed, tmp_path / "run")
    CORRUPTIONS[how](d / "checkpoints" / "step_000000006")
    (d / "checkpoints" / "step_000000012.bak").mkdir()  # a stray entry: ignored, no crash
    (d / "checkpoints" / "notes.txt").write_text("x")
    tr = build_trainer(cfg, d, model_seed=11)
    assert tr.state.step == 4
    assert "checkpoint step_000000006 is corrupt, skipping it" in caplog.text
    assert "resuming from step_000000004, the newest intact checkpoint" in caplog.text
    assert (d / "checkpoints" / (INVALID_PREFIX + "step_000000006")).is_dir()  # kept for inspection
    assert tr.fit() == 0
    assert train_losses(d) == ref  # bit for bit from step 4 on
    assert _names(d) == ["step_000000004", "step_000000006", "step_000000008"]


def test_no_intact_checkpoint_is_an_error_not_a_fresh_start(tmp_path, reference):
    cfg, ref, crashed = reference
    d = _copy(crashed, tmp_path / "run")
    for c in (d / "checkpoints").iterdir():
        _flip(c / "__0_0.distcp")
    with pytest.raises(RuntimeError, match=r"no intact checkpoint .*step_000000006: __0_0.distcp has CRC32"):
        build_trainer(cfg, d)


def test_checkpoints_without_their_marker_are_an_error_not_a_fresh_start(tmp_path, reference):
    """A run directory copied without the COMPLETE markers: starting afresh would overwrite those steps."""
    import copy

    cfg, ref, crashed = reference
    cfg = copy.deepcopy(cfg)  # shared by the module's tests
    d = _copy(crashed, tmp_path / "run")
    for c in (d / "checkpoints").iterdir():
        (c / MARKER).unlink()
    before = sorted(p.name for p in (d / "checkpoints").iterdir())
    with pytest.raises(ConfigError, match=r"holds checkpoints without their COMPLETE marker \(step_000000002, "
                                          r"step_000000004, step_000000006\) and none with one"):
        build_trainer(cfg, d)
    assert sorted(p.name for p in (d / "checkpoints").iterdir()) == before  # untouched
    # the fix the message names works also without metrics.jsonl (only checkpoints/ was copied)
    (d / "metrics.jsonl").unlink()
    cfg.checkpoint.resume = False
    with pytest.raises(ConfigError, match=r"checkpoint.resume=false but the run directory .* holds an earlier run "
                                          r"\(checkpoints up to step_000000006\)"):
        build_trainer(cfg, d)
    cfg.checkpoint.resume, cfg.checkpoint.overwrite = True, True
    tr = build_trainer(cfg, d)
    assert tr.state.step == 0 and not list((d / "checkpoints").iterdir())
    assert sorted(p.name for p in next(d.glob("previous-*")).joinpath("checkpoints").iterdir()) == before


# ---- 5. data changes ------------------------------------------------------------------------------
def test_changed_data_is_refused_unless_allowed(tmp_path, reference):
    cfg, ref, crashed = reference
    d = tmp_path / "run"
    fp = {"tokenizer": "aaaa", "data.sources[0] files": "3 files, 123"}
    with pytest.raises(KeyboardInterrupt):
        build_trainer(cfg, d, on_batch=_crash_at_step(3), data_fingerprint=fp).fit()
    changed = dict(fp, **{"data.sources[0] files": "4 files, 456"})
    with pytest.raises(ConfigError, match=r"would not continue its data stream: data.sources\[0\] files: 3 files, "
                                          r"123 -> 4 files, 456\. Pass checkpoint.allow_data_change=true"):
        build_trainer(cfg, d, data_fingerprint=changed)
    cfg2 = small_run_config(max_steps=8)
    cfg2.checkpoint.every, cfg2.checkpoint.allow_data_change = 2, True
    assert build_trainer(cfg2, d, data_fingerprint=changed).state.step == 2


def test_other_world_size_is_refused_for_a_loader_without_readers(tmp_path, reference):
    """The stand-in loader's per-rank states cannot move to other ranks (data/loader.py's readers can)."""
    cfg, ref, crashed = reference
    d = _copy(crashed, tmp_path / "run")
    meta = d / "checkpoints" / "step_000000006" / "trainer.json"
    state = json.loads(meta.read_text())
    state["world_size"] = 2  # as if written by 2 ranks (the manifest's CRC is rewritten to match)
    _rewrite(meta.parent, "trainer.json", json.dumps(state).encode())
    with pytest.raises(ConfigError, match=r"ranks: 2 -> this run's \(its data-loader states cannot be moved .*"
                                          r"loaders would start over\)\. Pass checkpoint.allow_data_change=true"):
        build_trainer(cfg, d)


def _rewrite(ckpt, name, data):
    from trainer.checkpoint_integrity import complete_marker, crc32_file, manifest_bytes

    (ckpt / name).write_bytes(data)
    files = json.loads((ckpt / MANIFEST).read_text())["files"]
    files[name] = list(crc32_file(ckpt / name))
    man = manifest_bytes(files)
    (ckpt / MANIFEST).write_bytes(man)
    (ckpt / MARKER).write_bytes(complete_marker(man))


# ---- 6. one job per run directory -------------------------------------------------------------------
def test_run_dir_lock_names_the_owner_and_takes_over_a_dead_ones(tmp_path):
    d = tmp_path / "run"
    cfg = small_run_config(max_steps=2)
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        d.mkdir()
        (d / "checkpoints").mkdir()
        partial = d / "checkpoints" / (TMP_PREFIX + "step_000000003")  # the live owner's save in progress
        partial.mkdir()
        lock = {"host": socket.gethostname(), "pid": owner.pid, "proc_start": _start(owner.pid),
                "started": "2026-01-01 00:00:00 UTC"}
        (d / LOCK_NAME).write_text(json.dumps(lock))
        with pytest.raises(RunDirBusy, match=rf"in use by pid {owner.pid} on host {socket.gethostname()} .*delete "):
            build_trainer(cfg, d)
        assert partial.is_dir()  # the other job's save is left alone
    finally:
        owner.kill()
        owner.wait()
    tr = build_trainer(cfg, d)  # the owner is dead: its lock is stale, its partial save removed
    assert not partial.exists()
    assert json.loads((d / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert tr.fit() == 0
    tr.ckpt.close()
    assert not (d / LOCK_NAME).exists()
    other_host = dict(lock, host="elsewhere")
    (d / LOCK_NAME).write_text(json.dumps(other_host))
    with pytest.raises(RunDirBusy, match="on host elsewhere"):  # cannot be checked from here: refused
        build_trainer(cfg, d)


def _start(pid):
    from trainer.run_lock import _proc_start
    return _proc_start(pid)


# ---- 11. disk full ------------------------------------------------------------------------------------
def test_too_little_free_space_is_refused_before_writing(tmp_path, reference, monkeypatch):
    cfg, ref, crashed = reference
    d = _copy(crashed, tmp_path / "run")
    tr = build_trainer(cfg, d)
    size = sum(p.stat().st_size for p in (d / "checkpoints" / "step_000000006").iterdir())
    monkeypatch.setattr(ckpt_mod.integ, "free_bytes", lambda path: size // 2)
    with pytest.raises(CheckpointDiskFull, match=r"not enough disk space for checkpoint step 8 .*needs about "
                                                 r".* MiB.*keep_last=3 the run needs 4 of them.*newest: "
                                                 r"step_000000006"):
        tr.fit()
    assert _names(d) == ["step_000000002", "step_000000004", "step_000000006"]
    assert not list((d / "checkpoints").glob(TMP_PREFIX + "*"))


def test_disk_full_during_a_save_keeps_older_checkpoints(tmp_path, reference, monkeypatch):
    cfg, ref, crashed = reference
    d = _copy(crashed, tmp_path / "run")
    real = ckpt_mod.integ.write_file

    def enospc(path, data):  # the rank file of the step-8 save hits a full disk
        if "step_000000008" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data)

    monkeypatch.setattr(ckpt_mod.integ, "write_file", enospc)
    with pytest.raises(CheckpointDiskFull, match=r"ran out of disk space while writing checkpoint step 8.*The "
                                                 r"partial save was removed; the older checkpoints are intact"):
        build_trainer(cfg, d).fit()
    assert _names(d) == ["step_000000002", "step_000000004", "step_000000006"]
    assert not list((d / "checkpoints").glob(TMP_PREFIX + "*"))
    monkeypatch.setattr(ckpt_mod.integ, "write_file", real)
    assert build_trainer(cfg, d).fit() == 0
    assert train_losses(d) == ref


# ---- async saves --------------------------------------------------------------------------------------
def test_async_saves_resume_exactly_and_complete_only_after_the_write(tmp_path, reference, monkeypatch):
    cfg, ref, crashed = reference
    acfg = small_run_config(max_steps=8)
    acfg.checkpoint.every, acfg.checkpoint.keep_last, acfg.checkpoint.async_save = 2, 3, True
    d = tmp_path / "run"
    seen = []
    real_finish = CheckpointManager._finish

    def finish(self, job, future):  # the background writer: nothing is complete before it ran
        seen.append((job.step, (job.final / MARKER).exists()))
        return real_finish(self, job, future)

    monkeypatch.setattr(CheckpointManager, "_finish", finish)
    tr = build_trainer(acfg, d, on_batch=_crash_at_step(7))
    with pytest.raises(KeyboardInterrupt):
        tr.fit()
    tr.ckpt.close()  # as train.py's `finally` does: the step-6 write, in flight at the crash, completes
    assert seen == [(2, False), (4, False), (6, False)]
    assert _names(d) == ["step_000000002", "step_000000004", "step_000000006"]
    tr = build_trainer(acfg, d, model_seed=3)
    assert tr.ckpt.async_save and tr.fit() == 0
    assert train_losses(d) == ref  # the background writes saved exactly the states of steps 2, 4, 6, 8
    assert tr.ckpt.last_save["step"] == 8 and tr.ckpt.last_save["written_s"] > 0


def test_checkpoint_without_manifest_still_resumes(tmp_path, reference):
    """Checkpoints written before manifests existed: structure-checked (files present), then loaded."""
    cfg, ref, crashed = reference
    d = _copy(crashed, tmp_path / "run")
    for c in (d / "checkpoints").iterdir():
        (c / MANIFEST).unlink()
        (c / MARKER).write_bytes(b"ok\n")
    (d / "checkpoints" / "step_000000006" / "rank00000.pt").unlink()  # still caught: a missing rank file
    tr = build_trainer(cfg, d)
    assert tr.state.step == 4 and tr.fit() == 0
    assert train_losses(d) == ref


def test_bench_checkpoint_reads_the_save_lines():
    from launch.bench_checkpoint import parse

    log = ("checkpoint step 4: staged in 0.50 s, written in 12.00 s in the background (x)\n"
           "checkpoint step 8: waited 3.00 s for the previous checkpoint's background write\n"
           "checkpoint step 8: staged in 0.40 s, written in 11.00 s in the background (x)\n"
           "checkpoint step 12: written in 90.00 s, training waited (x)\n")
    assert parse(log) == [{"step": 4, "stall_s": 0.5, "write_s": 12.0}, {"step": 8, "stall_s": 3.4, "write_s": 11.0},
                          {"step": 12, "stall_s": 90.0, "write_s": 0.0}]


def test_bench_checkpoint_runs_a_recipe_whose_warmup_is_longer_than_its_steps(tmp_path):
    """The README's command times a few steps of a recipe with a long warm-up (bench_3b: 200); here the debug
    recipe (2 warm-up steps) for 1 step, asynchronous mode only, on CPU."""
    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "bc.json"
    r = subprocess.run([sys.executable, "-m", "launch.bench_checkpoint", "--modes", "async", "--steps", "1",
                        "--every", "1", "--out", str(tmp_path / "runs"), "--json", str(out), "--",
                        "experiment=debug", "train.num_threads=1"], cwd=root, capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert list(res) == ["async"] and [s["step"] for s in res["async"]["saves"]] == [1]


def test_async_save_on_a_signal_is_complete_when_fit_returns(tmp_path, reference):
    import signal

    from trainer.checkpoint import EXIT_PREEMPTED

    cfg, ref, crashed = reference
    acfg = small_run_config(max_steps=8)
    acfg.checkpoint.every, acfg.checkpoint.keep_last, acfg.checkpoint.async_save = 0, 3, True
    d = tmp_path / "run"

    def sigterm(pos):
        if pos == 2 * ACCUM + 1:  # during step 3
            os.kill(os.getpid(), signal.SIGTERM)

    tr = build_trainer(acfg, d, on_batch=sigterm)
    assert tr.fit() == EXIT_PREEMPTED
    assert (d / "checkpoints" / "step_000000003" / MARKER).is_file()  # written before fit returned
    assert tr.ckpt._pending is None


def test_staging_buffers_are_reused_and_survive_torch_closing_the_stager():
    """torch 2.11's dcp.async_save closes the stager it was given after a save; ours keeps its CPU buffers
    (a second save must neither fail nor allocate again) and each stage copies the current values."""
    from trainer.checkpoint_staging import ReusedBufferStager

    w = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    state = {"model": {"w": w}, "optim": {"state": {"w": {"step": torch.tensor(1.0), "exp_avg": w * 2}},
                                          "param_groups": [{"lr": 1e-3, "params": ["w"]}]}}
    stager = ReusedBufferStager(pin_memory=False)
    first = stager.stage(state)
    buf = first["model"]["w"]
    assert buf is not w and torch.equal(buf, w)
    stager.close()
    w.add_(1)
    second = stager.stage(state)
    assert second["model"]["w"] is buf and torch.equal(buf, w)  # same buffer, new values
    assert second["optim"]["param_groups"][0]["lr"] == 1e-3
    state["model"]["v"] = torch.ones(4)  # another layout: new buffers
    assert "v" in stager.stage(state)["model"]


def test_staged_dtensors_keep_their_spec_share_one_buffer_and_round_trip_through_dcp(tmp_path):
    """The staging buffers are views into one host mapping; a DTensor is staged as a DTensor with its own
    spec around a CPU local tensor (what DCP plans from), the copy holds the current values, and an
    asynchronous DCP save of the staged state loads back to the same values."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    from trainer.checkpoint_staging import ReusedBufferStager

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        w = distribute_tensor(torch.randn(5, 3), mesh, [Shard(0)])
        b = torch.randn(7, dtype=torch.bfloat16)
        state = {"model": {"w": w, "b": b}, "optim": {"step": torch.tensor(3.0), "lr": 0.1, "names": ["w", "b"]}}
        stager = ReusedBufferStager(pin_memory=False, threads=3)
        staged = stager.stage(state)
        sw = staged["model"]["w"]
        assert isinstance(sw, DTensor) and sw._spec == w._spec and sw.to_local().device.type == "cpu"
        assert torch.equal(sw.to_local(), w.to_local()) and torch.equal(staged["model"]["b"], b)
        assert staged["optim"]["lr"] == 0.1 and staged["optim"]["names"] == ["w", "b"]
        host = stager._host.tensor
        lo, hi = host.data_ptr(), host.data_ptr() + host.numel()
        for t in (sw.to_local(), staged["model"]["b"], staged["optim"]["step"]):
            assert lo <= t.data_ptr() < hi and t.data_ptr() % 4096 == 0  # one mapping, page-aligned views

        w.to_local().mul_(2)
        b.add_(1)
        again = stager.stage(state)
        assert again["model"]["w"].to_local().data_ptr() == sw.to_local().data_ptr()  # reused
        assert torch.equal(again["model"]["w"].to_local(), w.to_local()) and torch.equal(again["model"]["b"], b)

        dcp.async_save(state, checkpoint_id=str(tmp_path / "ck"), async_stager=stager).result()
        out = {"model": {"w": distribute_tensor(torch.zeros(5, 3), mesh, [Shard(0)]),
                         "b": torch.zeros(7, dtype=torch.bfloat16)},
               "optim": {"step": torch.tensor(0.0), "lr": 0.0, "names": []}}
        dcp.load(out, checkpoint_id=str(tmp_path / "ck"))
        assert torch.equal(out["model"]["w"].to_local(), w.to_local()) and torch.equal(out["model"]["b"], b)
        assert float(out["optim"]["step"]) == 3.0
    finally:
        dist.destroy_process_group()
