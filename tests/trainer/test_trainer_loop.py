"""The step loop, checkpoints and resume on stand-ins (fast, independent of the real model and corpus)."""

import math
import os
import signal

import pytest
import torch

from trainer.checkpoint import EXIT_PREEMPTED, MARKER, TMP_PREFIX, CheckpointManager
from trainer.config import StageConfig
from trainer.loop import NonFiniteError
from trainer_standins import StandInLoader, build_trainer, read_metrics, small_run_config, train_losses


def _uninterrupted(tmp_path, cfg, name="full"):
    d = tmp_path / name
    assert build_trainer(cfg, d).fit() == 0
    return train_losses(d)


def test_exact_resume_after_signal(tmp_path):
    """SIGUSR1 mid-run: checkpoint after the step, exit 75; re-running resumes with bit-identical losses."""
    cfg = small_run_config(max_steps=7)
    cfg.checkpoint.every = 0  # only the signal's checkpoint (and the final one)
    ref = _uninterrupted(tmp_path, cfg)

    d = tmp_path / "resumed"
    per_step = cfg.curriculum.stages[0]
    accum = cfg.train.global_batch_tokens // (per_step.seq_len * per_step.micro_batch_size)

    def send_signal(pos):  # the signal arrives during step 4 (0-based 3)
        if pos == 3 * accum + 1:
            os.kill(os.getpid(), signal.SIGUSR1)

    assert build_trainer(cfg, d, on_batch=send_signal).fit() == EXIT_PREEMPTED
    assert [p.name for p in CheckpointManager(d, cfg.checkpoint, _world()).complete()] == ["step_000000004"]
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handler restored
    # A fresh model with other weights: everything must come from the checkpoint.
    assert build_trainer(cfg, d, model_seed=99).fit() == 0
    got = train_losses(d)
    assert got == ref  # bit for bit, every step
    assert len(ref) == 7 and ref[7] < ref[1]


def test_exact_resume_after_crash_and_keep_last(tmp_path):
    cfg = small_run_config(max_steps=8)
    cfg.checkpoint.every, cfg.checkpoint.keep_last = 2, 2
    ref = _uninterrupted(tmp_path, cfg)
    d = tmp_path / "crashed"

    def crash(pos):
        if pos == 11:  # during step 6
            raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt):
        build_trainer(cfg, d, on_batch=crash).fit()
    names = [p.name for p in CheckpointManager(d, cfg.checkpoint, _world()).complete()]
    assert names == ["step_000000002", "step_000000004"]
    assert build_trainer(cfg, d, model_seed=5).fit() == 0
    assert train_losses(d) == ref
    names = [p.name for p in CheckpointManager(d, cfg.checkpoint, _world()).complete()]
    assert names == ["step_000000006", "step_000000008"]  # keep_last=2
    # Re-running a finished run does nothing.
    n = len(read_metrics(d))
    assert build_trainer(cfg, d).fit() == 0 and len(read_metrics(d)) == n


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    import trainer.checkpoint as ckpt_mod

    cfg = small_run_config(max_steps=6)
    cfg.checkpoint.every = 3
    ref = _uninterrupted(tmp_path, cfg)
    d = tmp_path / "crash_in_save"
    real_save, calls = ckpt_mod.dcp.save, []

    def failing_save(state, checkpoint_id):
        calls.append(checkpoint_id)
        real_save(state, checkpoint_id=checkpoint_id)
        if len(calls) == 2:  # the step-6 save: shards written, crash before the marker and the rename
            raise KeyboardInterrupt("simulated crash mid-save")  # not an error the save handles: a crash

    monkeypatch.setattr(ckpt_mod.dcp, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        build_trainer(cfg, d).fit()
    monkeypatch.setattr(ckpt_mod.dcp, "save", real_save)
    root = d / "checkpoints"
    assert (root / (TMP_PREFIX + "step_000000006")).is_dir()
    assert not (root / (TMP_PREFIX + "step_000000006") / MARKER).exists()
    mgr = CheckpointManager(d, cfg.checkpoint, _world())  # removes the partial save
    assert [p.name for p in mgr.complete()] == ["step_000000003"]
    assert not (root / (TMP_PREFIX + "step_000000006")).exists()
    assert build_trainer(cfg, d, model_seed=7).fit() == 0  # resumes from step 3
    assert train_losses(d) == ref


def test_nonfinite_steps_are_skipped_then_halt(tmp_path):
    cfg = small_run_config(max_steps=6, max_consecutive_nonfinite=3)
    cfg.checkpoint.every = 0
    cfg.checkpoint.save_final = False
    tr = build_trainer(cfg, tmp_path / "skip")
    tr.model.nan_calls = {3}  # 2 micro-batches per step: the 2nd step's first forward is NaN
    assert tr.fit() == 0
    recs = read_metrics(tmp_path / "skip")
    assert tr.state.skipped == 1 and recs[-1]["skipped"] == 1 and tr.state.step == 6
    assert recs[1]["step"] == 2 and recs[1]["loss"] is None  # NaN is written as null in metrics.jsonl
    assert all(math.isfinite(r["loss"]) for r in recs if r["step"] != 2)
    assert all(torch.isfinite(p).all() for p in tr.model.parameters())  # the NaN step was not applied

    tr = build_trainer(small_run_config(max_steps=10, max_consecutive_nonfinite=3), tmp_path / "halt")
    tr.model.nan_calls = set(range(3, 100))  # from the 2nd step on, every micro-batch
    with pytest.raises(NonFiniteError, match=r"3 steps in a row .*train.max_consecutive_nonfinite=3"):
        tr.fit()
    assert tr.state.step == 3 and tr.state.skipped == 3


def test_curriculum_switches_stage_with_constant_tokens_and_resumes(tmp_path):
    cfg = small_run_config(max_steps=6)
    cfg.curriculum.stages = [StageConfig(seq_len=8, micro_batch_size=4, steps=2),
                             StageConfig(seq_len=16, micro_batch_size=2, tokens=128),
                             StageConfig(seq_len=32, micro_batch_size=2)]
    cfg.checkpoint.every = 0
    d = tmp_path / "full"
    assert build_trainer(cfg, d).fit() == 0
    recs = [r for r in read_metrics(d) if "loss" in r]
    assert [r["seq_len"] for r in recs] == [8, 8, 16, 16, 32, 32]
    assert [r["stage"] for r in recs] == [0, 0, 1, 1, 2, 2]
    assert [r["tokens"] for r in recs] == [64 * s for s in range(1, 7)]
    ref = train_losses(d)

    # Interrupt in stage 1 (step 3): resume must continue in stage 1 at the same data position.
    d2 = tmp_path / "resumed"
    seen = []

    def stop_in_stage1(pos):
        seen.append(pos)
        if len(seen) == 6:  # 4 micro-batches of stage 0, then the 2nd of stage 1 (step 3)
            os.kill(os.getpid(), signal.SIGTERM)

    assert build_trainer(cfg, d2, on_batch=stop_in_stage1).fit() == EXIT_PREEMPTED
    assert build_trainer(cfg, d2, model_seed=3).fit() == 0
    assert train_losses(d2) == ref


def test_validation_records(tmp_path):
    cfg = small_run_config(max_steps=4)
    cfg.train.eval_every, cfg.train.eval_batches = 2, 2
    d = tmp_path / "val"
    assert build_trainer(cfg, d).fit() == 0
    vals = [r for r in read_metrics(d) if "val_loss" in r]
    assert [r["step"] for r in vals] == [2, 4]
    assert all(abs(r["val_ppl"] - math.exp(r["val_loss"])) < 1e-9 * r["val_ppl"] for r in vals)
    assert all(0 < r["val_s"] < 60 for r in vals), vals  # seconds the validation took


def test_validation_weights_a_padded_last_batch_by_its_targets(tmp_path):
    """A validation split's last batch comes padded with ignored targets (data/stream.py): the loss is the mean
    over the real targets, as one full batch of the same rows gives, and val_tokens counts them."""
    cfg = small_run_config(max_steps=1)
    cfg.train.eval_every, cfg.train.eval_batches = 1, 10
    trainer = build_trainer(cfg, tmp_path / "v")
    stage = trainer.curriculum.stage_at(0)  # micro-batch 4, rows of 8
    rows = next(iter(StandInLoader(8, 6, split="val")))  # 6 real rows: a full batch, then 2 rows and 2 padding
    pad = trainer._padding_batch(stage)
    batches = [{k: v[:4] for k, v in rows.items()},
               {k: torch.cat([v[4:], pad[k][:2]]) for k, v in rows.items()}]
    trainer.make_eval_loader = lambda stage: batches
    got = trainer.evaluate(stage)
    with torch.no_grad():
        ref = trainer.model(rows["input_ids"], targets=rows["targets"]).lm_loss.item()
    assert got["val_tokens"] == 6 * 8
    assert abs(got["val_loss"] - ref) < 1e-5, (got, ref)
    # a rank whose split ran out repeats its last batch's tokens with every target ignored
    filler = trainer._padding_batch(stage, batches[0])
    assert torch.equal(filler["input_ids"], batches[0]["input_ids"]) and (filler["targets"] == -100).all()


def _world():
    from trainer.distributed import World
    return World()
