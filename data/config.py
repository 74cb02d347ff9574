"""Typed schema of the `data` config group (conf/data/*.yaml), registered in Hydra's ConfigStore by trainer/.

Default: the embedded corpus (Python stdlib sources) and a 2048-token BPE tokenizer trained on it on first
use and cached. Own corpus, e.g. conf/data/my_corpus.yaml:

    sources:
      - {path: /data/web/*.jsonl, text_field: text, weight: 3.0}
      - {path: /data/code/**/*.parquet, text_field: content, weight: 1.0}
    tokenizer: /data/tok32k.model
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

FORMATS = ("auto", "text", "jsonl", "parquet")
TEXT_UNITS = ("file", "paragraph", "line")
BUILTINS = ("python_stdlib",)


def _err(key: str, value, fix: str) -> ValueError:
    return ValueError(f"{key}={value!r}: {fix}")


@dataclass
class SourceConfig:
    """One corpus. Exactly one of `builtin`, `path`, `name`."""

    builtin: Optional[str] = None
    """An embedded corpus that works offline: 'python_stdlib' (the standard library's *.py files)."""
    path: Optional[str] = None
    """Local file, directory or glob ('**' recursive): .txt/.md/.py/... text, .jsonl/.json(.gz), .parquet."""
    name: Optional[str] = None
    """HF hub dataset name (or local dataset dir) streamed with `datasets` (networked clusters; never tests)."""
    subset: Optional[str] = None
    """Hub dataset config name (e.g. 'sample-10BT'); only with `name`."""
    split: str = "train"
    """Hub dataset split streamed; only with `name`."""
    format: str = "auto"
    """For `path`: auto (by extension) | text | jsonl | parquet."""
    text_field: str = "text"
    """Field (JSONL) / column (Parquet, hub) that holds the document text."""
    text_unit: str = "file"
    """For text files: one document per 'file', per blank-line separated 'paragraph', or per 'line'."""
    weight: float = 1.0
    """Relative sampling weight in the mixture (probability weight / sum of weights, per document)."""

    def validate(self, key: str) -> None:
        given = [k for k in ("builtin", "path", "name") if getattr(self, k)]
        if len(given) != 1:
            raise _err(f"{key}.builtin/path/name", given or None,
                       "set exactly one of builtin (python_stdlib), path (files/glob) or name (hub dataset)")
        if self.builtin and self.builtin not in BUILTINS:
            raise _err(f"{key}.builtin", self.builtin, f"allowed: {BUILTINS}")
        if self.format not in FORMATS:
            raise _err(f"{key}.format", self.format, f"allowed: {FORMATS}")
        if self.text_unit not in TEXT_UNITS:
            raise _err(f"{key}.text_unit", self.text_unit, f"allowed: {TEXT_UNITS}")
        if not (self.weight > 0):
            raise _err(f"{key}.weight", self.weight, "use a positive number (relative mixture weight)")
        if not self.text_field:
            raise _err(f"{key}.text_field", self.text_field, "name the field/column holding the text")


@dataclass
class DataConfig:
    """Streaming corpus, tokenizer and loader settings."""

    sources: List[SourceConfig] = field(default_factory=lambda: [SourceConfig(builtin="python_stdlib")])
    """Training corpora (a weighted mixture when several)."""
    tokenizer: Optional[str] = None
    """Path of a sentencepiece .model; None = the default one, trained on the embedded corpus and cached."""
    vocab_size: int = 2048
    """Vocabulary of the default tokenizer (only when tokenizer is None); at most model.vocab_size."""
    tokenizer_cache_dir: Optional[str] = None
    """Cache of the default tokenizer; None = $JAMBA_CACHE_DIR or ~/.cache/jamba-train."""
    num_workers: int = 1
    """DataLoader worker processes per rank that tokenise and pack (0 = in the training process)."""
    readers: int = 0
    """Independent streams the training corpus is cut into, fixed for the whole run: a resume on another number
    of ranks or workers continues every one where it stopped (at most this many data-parallel ranks can then
    read it). 0 = data-parallel size x max(1, num_workers) when the run starts; raise it (e.g. 64) for a run
    that may grow. A worker with several readers hands out their batches in turn; each has its own shuffle
    buffer."""
    prefetch_factor: int = 4
    """Batches each worker prepares ahead (num_workers > 0)."""
    shuffle_buffer: int = 64
    """Documents in each reader's seeded shuffle buffer (its tokens are part of the checkpointed state)."""
    max_doc_chars: int = 1_000_000
    """Longer documents are split into pieces of at most this many characters (counted as split_docs)."""
    doc_ids: bool = True
    """Also return `doc_ids` [B, L] (document number inside each row) for attention document masking."""
    validation_fraction: float = 0.02
    """Held-out share of `sources` (by hash of the document, or of the file path for builtin corpora),
    used when validation_sources is empty. 0 = no validation split."""
    validation_sources: List[SourceConfig] = field(default_factory=list)
    """Explicit validation corpora; when given, `sources` are used whole for training."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not self.sources:
            raise _err("data.sources", self.sources, "give at least one source (default: [{builtin: python_stdlib}])")
        self.sources = [_as_source(s) for s in self.sources]
        self.validation_sources = [_as_source(s) for s in self.validation_sources]
        for i, s in enumerate(self.sources):
            s.validate(f"data.sources[{i}]")
        for i, s in enumerate(self.validation_sources):
            s.validate(f"data.validation_sources[{i}]")
        if self.tokenizer is None and not (260 <= self.vocab_size <= 1_000_000):
            raise _err("data.vocab_size", self.vocab_size, "use 260..1000000 (256 byte pieces + specials)")
        for key, lo in (("num_workers", 0), ("readers", 0), ("prefetch_factor", 1), ("shuffle_buffer", 1),
                        ("max_doc_chars", 1000)):
            v = getattr(self, key)
            if not isinstance(v, int) or v < lo:
                raise _err(f"data.{key}", v, f"use an integer >= {lo}")
        if not (0.0 <= self.validation_fraction < 1.0):
            raise _err("data.validation_fraction", self.validation_fraction, "use a fraction in [0, 1), e.g. 0.02")


def _as_source(s) -> SourceConfig:
    if isinstance(s, SourceConfig):
        return s
    if isinstance(s, dict) or hasattr(s, "keys"):
        return SourceConfig(**dict(s))
    if isinstance(s, str):  # shorthand: a path
        return SourceConfig(path=s)
    raise _err("data.sources[]", s, "each source is a mapping like {path: corpus/*.jsonl, weight: 1.0}")
