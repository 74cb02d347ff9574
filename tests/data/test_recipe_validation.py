"""experiment=long_context_2gpu validates at its longest stage on the built-in corpus: the held-out split
(data.validation_fraction of the recipe) packs at least one row of the last stage's length. On 2 H200s, with
the default 2% split, the 1M stage logged 'validation split gave no batches'."""

from pathlib import Path

from hydra import compose, initialize_config_dir

import train  # noqa: F401  (registers the schema and the run-dir resolver)
from data.config import DataConfig
from data.loader import build_dataloader
from data.tokenizer import load_tokenizer
from trainer.config import to_object

CONF = str(Path(__file__).resolve().parents[2] / "conf")


def test_long_context_recipe_has_a_validation_row_at_its_longest_stage():
    with initialize_config_dir(config_dir=CONF, version_base=None):
        cfg = to_object(compose(config_name="config", overrides=["experiment=long_context_2gpu"]))
    longest = max(s.seq_len for s in cfg.curriculum.stages)
    assert longest == 1048576
    data = cfg.data if isinstance(cfg.data, DataConfig) else DataConfig(**dict(cfg.data))
    tok = load_tokenizer(data)
    loader = build_dataloader(data, tok, seq_len=longest, micro_batch_size=1, split="validation")  # dp = 1 (cp=2)
    batch = next(iter(loader), None)
    assert batch is not None, f"no {longest}-token validation row at data.validation_fraction={data.validation_fraction}"
