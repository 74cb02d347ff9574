"""Stand-ins for the loop tests that must not depend on the real model or corpus: a small causal LM with the
model API's output fields (loss, lm_loss, aux_loss, expert_counts) and a deterministic, resumable loader."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import CheckpointConfig, CurriculumConfig, LoggingConfig, RunConfig, StageConfig, TrainConfig


class StandInLM(nn.Module):
    """Embedding -> residual MLP with a 4-way router -> vocab head; nan_steps makes chosen calls non-finite."""

    def __init__(self, vocab: int = 32, dim: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim)
        self.router = nn.Linear(dim, 4, bias=False)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.calls = 0
        self.nan_calls: set = set()

    @staticmethod
    def weight_decay_filter(name: str, param: torch.Tensor) -> bool:
        return param.ndim >= 2 and "embed" not in name

    def forward(self, input_ids, labels=None, doc_ids=None, targets=None):
        self.calls += 1
        h = self.embed(input_ids)  # (B, L, D)
        h = h + self.down(F.gelu(self.up(self.norm(h))))
        probs = self.router(h).softmax(-1)  # (B, L, 4)
        counts = torch.bincount(probs.argmax(-1).flatten(), minlength=4)[None]  # (1, 4)
        aux = 4 * (probs.mean((0, 1)) ** 2).sum()
        logits = self.head(h)  # (B, L, V)
        lm = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)  # the trainer's aligned targets
        if self.calls in self.nan_calls:
            lm = lm * float("nan")
        return SimpleNamespace(loss=lm + 0.01 * aux, lm_loss=lm, aux_loss=aux, z_loss=None,
                               expert_counts=counts, logits=None)


class StandInLoader:
    """Batch i of rank r is a pure function of (seed, r, seq_len, i): easy exact resume. A simple pattern
    (next token = token + 1 mod vocab, random starts) so the loss falls."""

    def __init__(self, seq_len: int, micro_batch_size: int, dp_rank: int = 0, seed: int = 0, vocab: int = 32,
                 split: str = "train", on_batch=None):
        self.seq_len, self.mb, self.rank, self.seed, self.vocab = seq_len, micro_batch_size, dp_rank, seed, vocab
        self.split = split
        self.pos = 0
        self.on_batch = on_batch  # called with the batch index before it is produced (tests: signals, crashes)

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = state["pos"]

    def __iter__(self):
        while True:
            if self.on_batch is not None:
                self.on_batch(self.pos)
            key = ((self.seed * 1_000_003 + self.rank) * 1_009 + self.seq_len) * 1_000_033 + self.pos
            g = torch.Generator().manual_seed(key * 2 + (self.split == "train"))
            start = torch.randint(0, self.vocab, (self.mb, 1), generator=g)
            ids = (start + torch.arange(self.seq_len + 1)) % self.vocab  # (B, L+1)
            noise = torch.rand(ids.shape, generator=g) < 0.1
            ids = torch.where(noise, torch.randint(0, self.vocab, ids.shape, generator=g), ids)
            self.pos += 1
            yield {"input_ids": ids[:, :-1].contiguous(), "targets": ids[:, 1:].contiguous()}


def small_run_config(max_steps: int = 6, **train) -> RunConfig:
    cfg = RunConfig()
    cfg.data, cfg.parallel = None, None
    cfg.train = TrainConfig(max_steps=max_steps, global_batch_tokens=64, device="cpu", eval_every=0,
                            **train)
    cfg.optim.warmup_steps = 1
    cfg.optim.lr = 1e-2
    cfg.curriculum = CurriculumConfig(stages=[StageConfig(seq_len=8, micro_batch_size=4)])
    cfg.logging = LoggingConfig(log_every=1, progress_bar=False)
    cfg.logging.wandb.mode = "disabled"
    cfg.checkpoint = CheckpointConfig(every=3, keep_last=2)
    return cfg


def build_trainer(cfg: RunConfig, run_dir, world=None, dp_size: int = 1, model_seed: int = 0, grad_sync=None,
                  model: nn.Module = None, on_batch=None, data_fingerprint=None):
    """The loop wired to the stand-ins, as train.py wires it to the real pieces."""
    from trainer.checkpoint import CheckpointManager
    from trainer.curriculum import Curriculum
    from trainer.distributed import World
    from trainer.loop import Trainer
    from trainer.metrics import MetricsLogger
    from trainer.optim import build_optimizer

    world = world or World()
    if model is None:
        torch.manual_seed(model_seed)
        model = StandInLM()
    optimizer = build_optimizer(model, cfg.optim, "cpu")
    t = cfg.train
    curriculum = Curriculum(cfg.curriculum, t.global_batch_tokens, t.max_steps, dp_size)

    def make_loader(stage, state):
        loader = StandInLoader(stage.seq_len, stage.micro_batch_size, dp_rank=world.rank, seed=t.seed,
                               on_batch=on_batch)
        if state is not None:
            loader.load_state_dict(state)
        return loader

    def make_eval_loader(stage):
        return StandInLoader(stage.seq_len, stage.micro_batch_size, dp_rank=world.rank, seed=t.seed, split="val")

    ckpt = CheckpointManager(run_dir, cfg.checkpoint, world, data_fingerprint)
    trainer = Trainer(cfg, model, optimizer, curriculum, make_loader, make_eval_loader, ckpt, None, world,
                      torch.device("cpu"), dp_size, grad_sync=grad_sync)
    trainer.restore()
    trainer.metrics = MetricsLogger(run_dir, cfg.logging, world.is_main, t.max_steps, trainer.state.step)
    return trainer


def read_metrics(run_dir):
    import json
    from pathlib import Path

    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir):
    """step -> loss of the training records (the last record wins when a step was logged twice)."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}
