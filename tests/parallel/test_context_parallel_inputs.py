"""`shard_inputs` (parallel/context_parallel.py) on one process: which tensors a cp rank keeps, for the
model's current forward (aligned `labels`) and for one with `targets` (then `labels` are transformers'
convention and are shifted on the whole row before slicing: the shard's last position keeps its target)."""

from typing import Optional

import pytest
import torch
import torch.nn as nn

from parallel.context_parallel import shard_inputs


class _Cp:  # rank 1 of cp=2, no process group needed by the hook
    n, rank = 2, 1

    def chunk(self, t, dim):
        return t.chunk(self.n, dim=dim)[self.rank]


class AlignedLabels(nn.Module):
    def forward(self, input_ids, labels: Optional[torch.Tensor] = None, doc_ids: Optional[torch.Tensor] = None):
        return dict(input_ids=input_ids, labels=labels, doc_ids=doc_ids)


class WithTargets(nn.Module):
    def forward(self, input_ids, labels=None, doc_ids=None, targets=None):
        return dict(input_ids=input_ids, labels=labels, doc_ids=doc_ids, targets=targets)


ROW = torch.arange(12).view(1, 12)


def test_aligned_labels_are_sliced_with_the_tokens():
    m = AlignedLabels()
    shard_inputs(m, _Cp())
    out = m(ROW, labels=ROW + 1, doc_ids=ROW // 4)
    assert out["input_ids"].tolist() == [[6, 7, 8, 9, 10, 11]]
    assert out["labels"].tolist() == [[7, 8, 9, 10, 11, 12]]
    assert out["doc_ids"].tolist() == (ROW // 4).tolist()  # whole rows


def test_hf_labels_become_targets_before_slicing():
    m = WithTargets()
    shard_inputs(m, _Cp())
    out = m(ROW, labels=ROW)  # HF convention: position t predicts labels[t + 1]
    assert out["labels"] is None and out["input_ids"].tolist() == [[6, 7, 8, 9, 10, 11]]
    assert out["targets"].tolist() == [[7, 8, 9, 10, 11, -100]]
    first = WithTargets()
    c = _Cp()
    c.rank = 0
    shard_inputs(first, c)
    assert first(ROW, labels=ROW)["targets"].tolist() == [[1, 2, 3, 4, 5, 6]]  # 6: the next shard's first token
    out = m(ROW, targets=ROW + 1)
    assert out["targets"].tolist() == [[7, 8, 9, 10, 11, 12]]


def test_sequence_not_divisible_by_cp_is_refused():
    m = AlignedLabels()
    shard_inputs(m, _Cp())
    with pytest.raises(ValueError, match="sequence length 11 is not divisible by parallel.cp=2"):
        m(torch.zeros(1, 11, dtype=torch.long))
