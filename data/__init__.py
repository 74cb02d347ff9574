"""Streaming corpus, sentencepiece tokenizer, packing and exact resumable loader state.

    from data import DataConfig, build_dataloader, load_tokenizer
    tok = load_tokenizer(DataConfig())      # default: BPE 2048 trained on the Python stdlib, cached
    loader = build_dataloader(DataConfig(), tok, seq_len=256, micro_batch_size=8, dp_rank=0, dp_world_size=1, seed=0)
"""

from data.config import DataConfig, SourceConfig
from data.loader import PackedLoader, build_dataloader
from data.tokenizer import Tokenizer, ensure_default_tokenizer, load_tokenizer, train_tokenizer

__all__ = ["DataConfig", "SourceConfig", "PackedLoader", "build_dataloader", "Tokenizer", "load_tokenizer",
           "ensure_default_tokenizer", "train_tokenizer"]
