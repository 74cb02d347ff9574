"""What metrics.jsonl and the log say: each step once after a resume, the non-finite warning numbered as in
metrics.jsonl, bad-data skip counters."""

import json
import logging
import os

import pytest

from tests.trainer.trainer_standins import build_trainer, read_metrics, small_run_config
from trainer.config import LoggingConfig
from trainer.metrics import REPLAYED, MetricsLogger


def test_resume_sets_aside_the_records_it_redoes(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 10.0 - s}) for s in range(1, 11)]
    lines.insert(6, json.dumps({"step": 6, "val_loss": 3.0}))
    path.write_text("\n".join(lines) + '\n{"step": 11, "lo')  # a line torn by kill -9
    cfg = LoggingConfig(progress_bar=False)
    cfg.wandb.mode = "disabled"
    m = MetricsLogger(tmp_path, cfg, True, 20, start_step=6)
    m.log({"step": 7, "loss": 1.5, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1.0, "mem_gb": 0.1})
    m.close()
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6, 6, 7] and recs[-1]["loss"] == 1.5
    moved = (tmp_path / REPLAYED).read_text().splitlines()
    assert [json.loads(x)["step"] for x in moved[:-1]] == [7, 8, 9, 10] and moved[-1] == '{"step": 11, "lo'


def _steps_seen_by_a_reader(d):
    """What a reader of both files sees now: step -> how many records (torn lines skipped)."""
    seen = {}
    for name in (REPLAYED, "metrics.jsonl"):
        f = d / name
        for line in (f.read_text().splitlines() if f.is_file() else []):
            try:
                step = json.loads(line)["step"]
            except ValueError:
                continue
            seen[step] = seen.get(step, 0) + 1
    return seen


def test_set_aside_never_shows_a_step_twice_to_a_reader(tmp_path, monkeypatch):
    """A reader polling both files while a resume moves records must not see a step that was not redone in both
    (the GPU scenario test took such a moment for a redone step and failed: appending to the replayed file first,
    then replacing metrics.jsonl, left that window). Checked at every file replacement of the move."""
    import trainer.metrics as metrics

    path = tmp_path / "metrics.jsonl"
    (tmp_path / REPLAYED).write_text(json.dumps({"step": 2, "loss": 9.0}) + "\n")  # an older resume's
    path.write_text("".join(json.dumps({"step": s, "loss": 10.0 - s}) + "\n" for s in range(1, 9)))
    views = []
    real_replace = os.replace

    def watched_replace(src, dst):
        views.append(_steps_seen_by_a_reader(tmp_path))
        real_replace(src, dst)
        views.append(_steps_seen_by_a_reader(tmp_path))

    monkeypatch.setattr(metrics.os, "replace", watched_replace)
    assert metrics.set_aside_replayed(path, start_step=4) == 4
    assert views, "the move replaced no file"
    for view in views:
        assert all(n == 1 for s, n in view.items() if s > 4), view
    assert _steps_seen_by_a_reader(tmp_path) == {1: 1, 2: 2, 3: 1, 4: 1, 5: 1, 6: 1, 7: 1, 8: 1}
    assert not list(tmp_path.glob("*.tmp"))


def test_set_aside_interrupted_loses_nothing(tmp_path):
    """kill -9 inside the move, at either side of its commit point (metrics.jsonl replaced): the next resume
    ends with every old record once in one of the two files and no temporaries left."""
    from trainer.metrics import set_aside_replayed

    def run_dir(name, committed):
        d = tmp_path / name
        d.mkdir()
        old = [json.dumps({"step": s, "loss": 10.0 - s}) + "\n" for s in range(1, 9)]
        moved = "".join(old[4:])
        if committed:  # metrics.jsonl replaced; only the replayed temporary has steps 5-8
            (d / "metrics.jsonl").write_text("".join(old[:4]))
            (d / (REPLAYED + ".tmp")).write_text(moved)
        else:  # both temporaries written, nothing replaced yet
            (d / "metrics.jsonl").write_text("".join(old))
            (d / "metrics.jsonl.tmp").write_text("".join(old[:4]))
            (d / (REPLAYED + ".tmp")).write_text(moved[: len(moved) // 2])  # even a half-written one
        return d

    for committed in (True, False):
        d = run_dir(f"committed_{committed}", committed)
        set_aside_replayed(d / "metrics.jsonl", start_step=4)  # the resume after the crash
        assert _steps_seen_by_a_reader(d) == {s: 1 for s in range(1, 9)}, (committed, _steps_seen_by_a_reader(d))
        assert [json.loads(x)["step"] for x in (d / REPLAYED).read_text().splitlines()] == [5, 6, 7, 8]
        assert not list(d.glob("*.tmp")), sorted(p.name for p in d.iterdir())


def test_set_aside_recovery_killed_midway_loses_and_repeats_nothing(tmp_path, monkeypatch):
    """The recovery itself killed between its two deletions (a move killed before its commit point, then the
    next start killed too): the start after that must not take the replayed temporary for a committed move."""
    import pathlib

    from trainer.metrics import set_aside_replayed

    old = [json.dumps({"step": s, "loss": 10.0 - s}) + "\n" for s in range(1, 9)]
    (tmp_path / "metrics.jsonl").write_text("".join(old))
    (tmp_path / "metrics.jsonl.tmp").write_text("".join(old[:4]))  # the killed move's two temporaries
    (tmp_path / (REPLAYED + ".tmp")).write_text("".join(old[4:]))
    real_unlink = pathlib.Path.unlink

    def killed_after_one(self, *a, **kw):
        real_unlink(self, *a, **kw)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(pathlib.Path, "unlink", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        set_aside_replayed(tmp_path / "metrics.jsonl", start_step=4)
    monkeypatch.setattr(pathlib.Path, "unlink", real_unlink)
    set_aside_replayed(tmp_path / "metrics.jsonl", start_step=4)
    assert _steps_seen_by_a_reader(tmp_path) == {s: 1 for s in range(1, 9)}
    assert not list(tmp_path.glob("*.tmp"))


def test_resumed_trainer_logs_each_step_once(tmp_path):
    cfg = small_run_config(max_steps=8)
    d = tmp_path / "run"
    tr = build_trainer(cfg, d)
    tr.cfg.train.max_steps = 5  # stop after step 5; the newest checkpoint is step 3
    tr.cfg.checkpoint.save_final = False
    assert tr.fit() == 0
    cfg = small_run_config(max_steps=8)
    assert build_trainer(cfg, d).fit() == 0  # resumes at 3, redoes 4 and 5
    steps = [r["step"] for r in read_metrics(d)]
    assert steps == list(range(1, 9)), steps
    assert [json.loads(x)["step"] for x in (d / REPLAYED).read_text().splitlines()] == [4, 5]


def test_nonfinite_warning_names_the_step_metrics_logs(tmp_path, caplog):
    cfg = small_run_config(max_steps=4, max_consecutive_nonfinite=3)
    cfg.checkpoint.every = 0
    cfg.checkpoint.save_final = False
    tr = build_trainer(cfg, tmp_path / "skip")
    tr.model.nan_calls = {3}  # 2 micro-batches per step: the 2nd step's first forward is NaN
    with caplog.at_level(logging.WARNING, logger="trainer.loop"):
        assert tr.fit() == 0
    bad = [r["step"] for r in read_metrics(tmp_path / "skip") if r["loss"] is None]
    warned = [m for m in caplog.messages if "non-finite" in m]
    assert bad == [2] and len(warned) == 1 and warned[0].startswith("step 2:"), (bad, warned)


def test_bad_data_counters_reach_metrics_and_the_log_once_per_line(tmp_path):
    """train.py on a corpus with 15 invalid JSON lines, several epochs: skipped_json is 15 in metrics.jsonl and
    the log line (it was 63 after four epochs), with the DataLoader worker's counters."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.data.conftest import make_docs, write_jsonl

    corpus = write_jsonl(tmp_path / "c.jsonl", make_docs(6, seed=2, prefix="d"))
    with open(corpus, "a") as f:
        f.writelines(f'{{"text": "broken {i}\n' for i in range(15))
    run = tmp_path / "run"
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "train.py", "experiment=debug", "train.num_threads=1", "train.max_steps=12",
                        "train.eval_every=0", "checkpoint.every=0", f"hydra.run.dir={run}", "data.num_workers=1",
                        "data.validation_fraction=0", f"data.sources=[{{path:{corpus}}}]"],
                       cwd=root, env=dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled"),
                       capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    recs = [x for x in read_metrics(run) if "loss" in x]
    assert [x["step"] for x in recs] == list(range(1, 13))
    assert {x.get("skipped_json") for x in recs} == {15}, [x.get("skipped_json") for x in recs]
    assert out.count("bad data skipped: json 15") == 1, out[-3000:]  # on the log line where the count grew
    import torch
    rank = torch.load(run / "checkpoints" / "step_000000012" / "rank00000.pt", weights_only=False)
    epoch = rank["data"]["loader"]["workers"][0]["readers"][0][1]["sources"][0]["epoch"]
    assert epoch >= 3, f"the corpus should have been read several times (epoch {epoch})"
    assert "further skipped_json warnings suppressed" in out


def test_gc_pauses_are_measured_per_record_and_logged_when_long(tmp_path, caplog):
    """gc_ms / gc_full: the collector's time since the previous record (a full collection counted), and the
    log line names a pause of 100 ms or more; the trainer's records carry them and its callback is removed."""
    import gc

    from trainer.metrics import GCPauses

    pauses = GCPauses()
    junk = [[i] for i in range(300_000)]  # tracked objects for a full collection to walk
    gc.collect()
    first = pauses.read()
    assert first["gc_full"] >= 1 and first["gc_ms"] > 0, first
    pauses.close()
    gc.collect()
    assert pauses.read() == {"gc_ms": 0.0, "gc_full": 0} and pauses._callback not in gc.callbacks
    del junk
    cfg = LoggingConfig(progress_bar=False)
    cfg.wandb.mode = "disabled"
    m = MetricsLogger(tmp_path, cfg, True, 20)
    with caplog.at_level(logging.INFO):
        m.log({"step": 1, "loss": 1.5, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1.0, "mem_gb": 0.1,
               "gc_ms": 512.3, "gc_full": 1})
        m.log({"step": 2, "loss": 1.5, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1.0, "mem_gb": 0.1,
               "gc_ms": 3.0, "gc_full": 0})
    m.close()
    lines = [r.getMessage() for r in caplog.records if "step " in r.getMessage()]
    assert "gc 512 ms (1 full)" in lines[0] and "gc " not in lines[1], lines
    n_callbacks = len(gc.callbacks)
    run = tmp_path / "run"
    assert build_trainer(small_run_config(max_steps=4), run).fit() == 0
    recs = [r for r in read_metrics(run) if "loss" in r]
    assert recs and all("gc_ms" in r and "gc_full" in r for r in recs)
    assert len(gc.callbacks) == n_callbacks


def test_gc_freeze_after_the_first_step_and_undone_at_the_end(tmp_path):
    """train.gc_freeze (default): from the first training step on, the objects alive then sit in the
    collector's permanent generation (full collections skip them); fit() unfreezes when it returns; off, nothing
    is frozen."""
    import gc

    for freeze in (True, False):
        cfg = small_run_config(max_steps=4)
        cfg.train.gc_freeze = freeze
        tr = build_trainer(cfg, tmp_path / f"run_{freeze}")
        seen = []
        log = tr.metrics.log
        tr.metrics.log = lambda record: (seen.append(gc.get_freeze_count()), log(record))
        assert gc.get_freeze_count() == 0
        assert tr.fit() == 0
        assert seen and (all(n > 1000 for n in seen) if freeze else seen == [0] * len(seen)), seen
        assert gc.get_freeze_count() == 0
    # a second curriculum stage (new shapes, new compiled graphs) freezes again after its first step
    from trainer.config import CurriculumConfig, StageConfig

    cfg = small_run_config(max_steps=4)
    cfg.curriculum = CurriculumConfig(stages=[StageConfig(seq_len=8, micro_batch_size=4, steps=2),
                                              StageConfig(seq_len=16, micro_batch_size=2)])
    tr = build_trainer(cfg, tmp_path / "stages")
    assert tr.fit() == 0
    assert tr._gc_frozen == {("train", 0), ("train", 1)} and gc.get_freeze_count() == 0


def test_expert_biases_resume_when_the_rate_is_turned_on_or_off(tmp_path, caplog):
    """model.moe_router_bias_update_rate changed between a checkpoint and its resume: turned on, the run resumes
    with zero biases (everything else from the checkpoint) and says so; turned off, the saved biases are dropped,
    loudly."""
    import torch

    from jamba.config import get_preset
    from jamba.model import JambaForCausalLM

    def run(run_dir, rate, max_steps):
        torch.manual_seed(0)
        model = JambaForCausalLM(get_preset("tiny", vocab_size=32, moe_router_bias_update_rate=rate))
        update, model.updates = model.update_expert_biases, []
        model.update_expert_biases = lambda counts: (model.updates.append(counts.clone()), update(counts))
        assert build_trainer(small_run_config(max_steps=max_steps), run_dir, model=model).fit() == 0
        return model

    for first, then, says in ((0.0, 0.05, "start at zero"), (0.05, 0.0, "are dropped")):
        d = tmp_path / f"run_{first}"
        run(d, first, 3)  # a checkpoint at step 3
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            model = run(d, then, 5)  # resumes at step 3
        assert says in caplog.text and "moe_router_bias_update_rate" in caplog.text, caplog.text
        assert [r["step"] for r in read_metrics(d) if "loss" in r] == [1, 2, 3, 4, 5]
        biases = [b for n, b in model.named_buffers() if n.endswith("expert_bias")]
        assert len(biases) == (2 if then else 0)  # tiny: 2 MoE layers
        assert len(model.updates) == (2 if then else 0)  # steps 4 and 5 moved them (sign steps may cancel)


def test_read_jsonl_skips_only_a_torn_last_line_unless_told(tmp_path):
    from trainer.jsonl import read_jsonl

    f = tmp_path / "m.jsonl"
    assert read_jsonl(f) == []  # not written yet
    f.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')  # the last line torn by a kill -9
    assert read_jsonl(f) == [{"step": 1}, {"step": 2}]
    f.write_text('{"step": 1}\n{"ste\n{"step": 3}\n')  # a bad line inside is not a torn write in metrics.jsonl
    with pytest.raises(ValueError, match="line 2"):
        read_jsonl(f)
    assert read_jsonl(f, torn_anywhere=True) == [{"step": 1}, {"step": 3}]  # metrics.replayed.jsonl, tools


def test_validation_line_says_how_long_it_took(tmp_path, caplog):
    """The validation log line gives the targets scored and the seconds taken (the first validation of a compiled
    run includes its compilation: a pause a user otherwise sees without a reason)."""
    cfg = LoggingConfig(progress_bar=False)
    cfg.wandb.mode = "disabled"
    m = MetricsLogger(tmp_path, cfg, True, 20)
    with caplog.at_level(logging.INFO):
        m.log_eval({"step": 10, "val_loss": 4.25, "val_ppl": 70.1, "val_tokens": 40960, "val_s": 7.43})
        m.log_eval({"step": 20, "val_loss": 4.0, "val_ppl": 54.6})  # records of older runs: no tokens or time
    m.close()
    lines = [r.getMessage() for r in caplog.records if "val loss" in r.getMessage()]
    assert lines[0].endswith("val loss 4.2500 | val ppl 70.10 | 40,960 tokens | 7.4 s"), lines
    assert lines[1].endswith("val loss 4.0000 | val ppl 54.60"), lines
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["val_s"] == 7.43


def test_first_compiled_validation_is_announced(tmp_path, caplog):
    """With train.compile on, the first validation of each curriculum stage (new shapes) says that it compiles
    first; later ones and uncompiled runs say nothing before their result."""
    from trainer.config import StageConfig

    for compile_ in (True, False):
        cfg = small_run_config(max_steps=6)
        cfg.train.eval_every, cfg.train.eval_batches = 2, 1
        cfg.curriculum.stages = [StageConfig(seq_len=8, micro_batch_size=4, steps=4),
                                 StageConfig(seq_len=16, micro_batch_size=2)]
        tr = build_trainer(cfg, tmp_path / f"run_{compile_}")
        tr.compiled = compile_  # as train.py sets it (the stand-in model is not compiled: only the line is checked)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="trainer.loop"):
            assert tr.fit() == 0
        said = [r.getMessage() for r in caplog.records if "compiles the evaluation graphs" in r.getMessage()]
        assert said == (["step 2: validation; its first batch compiles the evaluation graphs first",
                         "step 6: validation; its first batch compiles the evaluation graphs first (curriculum stage "
                         "1's shapes)"] if compile_ else []), said


def test_progress_bar_only_on_a_terminal_unless_forced(tmp_path, monkeypatch):
    """logging.progress_bar null (default): a bar when rank 0's stderr is a terminal, none in a batch or SLURM
    log (a file, a pipe); true and false force it either way."""
    import io

    class Tty(io.StringIO):
        def isatty(self):
            return True

    for setting, tty, bar in ((None, False, False), (None, True, True), (True, False, True), (False, True, False)):
        monkeypatch.setattr("sys.stderr", Tty() if tty else io.StringIO())
        cfg = LoggingConfig(progress_bar=setting)
        cfg.wandb.mode = "disabled"
        run = tmp_path / f"{setting}_{tty}"
        run.mkdir()
        m = MetricsLogger(run, cfg, True, 20)
        assert (m.bar is not None) == bar, (setting, tty)
        m.close()
