"""Schedules, curriculum arithmetic, optimizer groups, gradient clipping, plots."""

import math

import pytest
import torch

from jamba.config import ConfigError
from trainer.config import CurriculumConfig, OptimConfig, StageConfig, validate_curriculum
from trainer.curriculum import Curriculum
from trainer.loop import clip_grad_norm
from trainer.optim import build_optimizer, lr_at


def test_cosine_schedule():
    cfg = OptimConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, schedule="cosine")
    lrs = [lr_at(s, cfg, 110) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warmup to the peak
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # halfway: 0.55
    assert lr_at(110, cfg, 110) == pytest.approx(0.1)  # ends at min_lr
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # monotone after warmup


def test_wsd_and_constant_schedules():
    cfg = OptimConfig(lr=2.0, min_lr_ratio=0.0, warmup_steps=5, schedule="wsd", decay_fraction=0.2)
    lrs = [lr_at(s, cfg, 100) for s in range(101)]
    assert lrs[4] == pytest.approx(2.0)
    assert all(v == 2.0 for v in lrs[5:80])  # stable phase
    assert lrs[90] == pytest.approx(1.0) and lrs[100] == pytest.approx(0.0)  # linear decay over the last 20%
    const = OptimConfig(lr=0.5, warmup_steps=2, schedule="constant")
    assert [lr_at(s, const, 10) for s in (0, 1, 2, 9)] == [0.25, 0.5, 0.5, 0.5]


def test_curriculum_stages_and_accumulation():
    cur = CurriculumConfig(stages=[StageConfig(seq_len=4096, micro_batch_size=8, tokens=100 * 2**22),
                                   StageConfig(seq_len=32768, micro_batch_size=1, steps=10),
                                   StageConfig(seq_len=2**20, micro_batch_size=1)])
    validate_curriculum(cur, 2**22, 200, dp_size=4)
    c = Curriculum(cur, 2**22, 200, dp_size=4)
    assert [(s.start_step, s.end_step, s.grad_accum) for s in c.stages] == [(0, 100, 32), (100, 110, 32),
                                                                           (110, 200, 1)]
    assert {c.tokens_per_step(s, 4) for s in c.stages} == {2**22}  # constant tokens per step
    assert c.stage_at(99).seq_len == 4096 and c.stage_at(100).seq_len == 32768 and c.stage_at(199).index == 2


@pytest.mark.parametrize("stages,gbt,steps,match", [
    ([StageConfig(seq_len=100, micro_batch_size=3)], 1000, 10, r"not a multiple of seq_len\(100\) \* micro_batch_size\(3\) \* dp\(2\) = 600"),
    ([StageConfig(seq_len=512, micro_batch_size=4)], 1024, 10, r"micro_batch_size\(4\) \* dp\(2\) = 4096 tokens, more than train.global_batch_tokens=1024"),
    ([StageConfig(seq_len=8, micro_batch_size=1), StageConfig(seq_len=16, micro_batch_size=1)], 64, 10, r"stages\[0\] has no length"),
    ([StageConfig(seq_len=8, micro_batch_size=1, steps=20)], 64, 10, r"add up to 20 steps, more than train.max_steps=10"),
    ([StageConfig(seq_len=8, micro_batch_size=1, steps=2, tokens=128)], 64, 10, r"not both"),
])
def test_curriculum_errors(stages, gbt, steps, match):
    with pytest.raises(ConfigError, match=match):
        validate_curriculum(CurriculumConfig(stages=stages), gbt, steps, dp_size=2)


def test_optimizer_decay_groups_follow_the_model_filter():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)
            self.A_log = torch.nn.Parameter(torch.zeros(4, 2))
            self.norm = torch.nn.LayerNorm(4)

        @staticmethod
        def weight_decay_filter(name, p):
            return p.ndim >= 2 and not name.endswith("A_log")

    m = M()
    opt = build_optimizer(m, OptimConfig(weight_decay=0.1), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and [id(p) for p in decay["params"]] == [id(m.lin.weight)]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 4  # bias, A_log, norm w+b


def test_clip_grad_norm_matches_torch():
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for p, q in zip(a, b):
        p.grad = torch.randn_like(p) * 3
        q.grad = p.grad.clone()
    n1 = clip_grad_norm(a, 1.0)
    n2 = torch.nn.utils.clip_grad_norm_(b, 1.0)
    assert torch.allclose(n1, n2)
    assert all(torch.allclose(p.grad, q.grad) for p, q in zip(a, b))
    assert clip_grad_norm(a, 0.0) == pytest.approx(1.0, rel=1e-5)  # already clipped; 0 = measure only


def test_plot_writes_pngs(tmp_path):
    import json

    from trainer.plot import main

    with open(tmp_path / "metrics.jsonl", "w") as f:
        for s in range(1, 21):
            f.write(json.dumps({"step": s, "tokens": 64 * s, "loss": 5 / s, "lr": 1e-3, "grad_norm": 1.0,
                                "tokens_per_s": 1000.0 + s}) + "\n")
        f.write(json.dumps({"step": 20, "tokens": 1280, "val_loss": 0.3, "val_ppl": 1.35}) + "\n")
        f.write('{"step": 21, "loss"')  # a line cut short by a crash is ignored
    assert main([str(tmp_path), "--out", str(tmp_path / "plots")]) == 0
    for name in ("loss.png", "lr.png", "throughput.png"):
        data = (tmp_path / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert main([str(tmp_path / "nope")]) == 2


def test_plot_takes_the_metrics_file_for_its_run_directory(tmp_path, capsys):
    import json

    from trainer.plot import main

    run = tmp_path / "base"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 5 / s, "lr": 1e-3,
                                                           "tokens_per_s": 1.0}) + "\n" for s in range(1, 6)))
    assert main([str(run / "metrics.jsonl")]) == 0  # as launch.ep_balance takes it: the PNGs go next to it
    assert sorted(p.name for p in run.glob("*.png")) == ["loss.png", "lr.png", "throughput.png"]
    assert main([str(run), "--out", str(run / "metrics.jsonl")]) == 2  # --out must be a directory
    assert "--out" in capsys.readouterr().err


def test_plot_refuses_a_run_without_records(tmp_path, capsys):
    from trainer.plot import main

    (tmp_path / "metrics.jsonl").write_text("")  # what a run that failed at start leaves
    assert main([str(tmp_path), "--out", str(tmp_path / "plots")]) == 2
    err = capsys.readouterr().err
    assert "no records yet" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "plots").exists() and not list(tmp_path.glob("*.png"))  # nothing written


def test_plot_smooths_the_loss_with_an_ema(tmp_path, monkeypatch):
    import json

    import matplotlib.axes

    from trainer.plot import ema, plot_run

    assert ema([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])  # bias-corrected: no pull towards 0
    x = [4.0, 0.0, 2.0]
    m1 = 0.1 * 4.0
    m2 = 0.9 * m1 + 0.1 * 0.0
    m3 = 0.9 * m2 + 0.1 * 2.0
    assert ema(x, 0.9) == pytest.approx([m1 / 0.1, m2 / (1 - 0.81), m3 / (1 - 0.729)])
    assert ema(x, 0.0) == x
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for s in range(1, 31):
            f.write(json.dumps({"step": s, "loss": 5 + (-1) ** s, "lr": 1e-3, "tokens_per_s": 1.0}) + "\n")
    lines = {}
    real_plot = matplotlib.axes.Axes.plot

    def spy(self, *args, **kw):
        lines[kw.get("label")] = list(args[1]) if len(args) > 1 else None
        return real_plot(self, *args, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    plot_run(tmp_path, smooth=0.9)
    raw, smooth = lines["train loss (logged steps)"], lines["train loss, EMA 0.9"]
    assert raw == [5 + (-1) ** s for s in range(1, 31)]
    assert max(smooth[10:]) - min(smooth[10:]) < 0.3 < max(raw) - min(raw)  # the alternating noise is smoothed


def test_wandb_mode_resolution(monkeypatch):
    from trainer.metrics import _wandb_mode

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert _wandb_mode("auto") == "offline"  # never blocks on the network without a key
    monkeypatch.setenv("WANDB_API_KEY", "x")
    assert _wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert _wandb_mode("auto") == "disabled" and _wandb_mode("offline") == "offline"


def test_reseed_after_move_gives_fresh_per_rank_streams():
    """A rank resumed on another number of ranks has no saved RNG state of its own: its streams come from
    (seed, step, rank), the same for the same resume, and neither another rank's, another step's, nor the first
    steps' (seed + rank) again."""
    import random

    import numpy as np

    from trainer.build import seed_everything
    from trainer.checkpoint import reseed_after_move

    def draws():
        return (torch.rand(4).tolist(), random.random(), float(np.random.rand()))

    def after_move(step, rank):
        reseed_after_move(1234, step, rank)
        return draws()

    assert after_move(8, 1) == after_move(8, 1)
    seed_everything(1234 + 1)
    first_steps = draws()
    others = [first_steps, after_move(8, 0), after_move(16, 1)]
    for other in others:
        assert all(a != b for a, b in zip(after_move(8, 1), other))
