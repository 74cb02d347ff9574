"""Context-length curriculum: which stage (seq_len, micro-batch, gradient accumulation) runs at a step.

Tokens per optimizer step are constant (`train.global_batch_tokens`), so a longer sequence means fewer
sequences per micro-batch or fewer accumulation steps; the LR schedule is a function of the step and so
continues across stages unchanged. The stage is a function of the step alone, which makes resume exact;
the checkpoint still records it and the resume checks that both agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

from trainer.config import CurriculumConfig, stage_steps


@dataclass(frozen=True)
class Stage:
    index: int
    seq_len: int
    micro_batch_size: int
    grad_accum: int
    start_step: int
    end_step: int  # exclusive


class Curriculum:
    def __init__(self, cfg: CurriculumConfig, global_batch_tokens: int, max_steps: int, dp_size: int):
        self.global_batch_tokens = global_batch_tokens
        self.stages: List[Stage] = []
        start = 0
        for i, s in enumerate(cfg.stages):
            n = stage_steps(s, global_batch_tokens)
            end = max_steps if n is None else min(max_steps, start + n)
            accum = global_batch_tokens // (s.seq_len * s.micro_batch_size * dp_size)
            self.stages.append(Stage(i, s.seq_len, s.micro_batch_size, accum, start, end))
            start = end
        if self.stages[-1].end_step < max_steps:  # the last stage runs until the end
            last = self.stages[-1]
            self.stages[-1] = Stage(last.index, last.seq_len, last.micro_batch_size, last.grad_accum,
                                    last.start_step, max_steps)

    def stage_at(self, step: int) -> Stage:
        for s in self.stages:
            if s.start_step <= step < s.end_step:
                return s
        return self.stages[-1]

    @property
    def max_seq_len(self) -> int:
        return max(s.seq_len for s in self.stages)

    def tokens_per_step(self, stage: Stage, dp_size: int) -> int:
        return stage.seq_len * stage.micro_batch_size * stage.grad_accum * dp_size
