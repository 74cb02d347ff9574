"""Streaming corpus, sentencepiece tokenizer, packing and exact resumable loader state.

    from data import DataConfig, build_dataloader, load_tokenizer
    tok = load_tokenizer(DataConfig())      # default: BPE 2048 trained on the Python stdlib, cached
    loader = build_dataloader(DataConfig(), tok, seq_len=256, micro_batch_size=8, dp_rank=0, dp_world_size=1, seed=0)

Names are imported lazily, so that `python -m data.tokenizer` / `python -m data.loader` run their module once.
"""

from jamba.lazy import lazy_exports

_EXPORTS = {
    "DataConfig": "data.config", "SourceConfig": "data.config",
    "PackedLoader": "data.loader", "build_dataloader": "data.loader",
    "Tokenizer": "data.tokenizer", "load_tokenizer": "data.tokenizer",
    "ensure_default_tokenizer": "data.tokenizer", "train_tokenizer": "data.tokenizer",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
