"""Config composition and validation: typos, wrong types and impossible combinations fail before any process
group, naming the key, the value and what is allowed."""

from pathlib import Path

import pytest
import torch.distributed as dist
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

import train  # registers the schema and the run-dir resolver
from jamba.config import ConfigError, get_preset
from trainer.config import to_object, validate_run

CONF = str(Path(__file__).resolve().parents[2] / "conf")


def _compose(*overrides):
    with initialize_config_dir(config_dir=CONF, version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def _full_message(exc):
    parts = []
    while exc is not None:
        parts.append(str(exc))
        exc = exc.__cause__
    return "\n".join(parts)


@pytest.mark.parametrize("override,needle", [
    ("optim.lrr=1", "optim.lrr"),
    ("optim.lr=fast", "Value 'fast' of type 'str' could not be converted to Float\n    full_key: optim.lr"),
    ("train.max_steps=1.5", "full_key: train.max_steps"),
    ("curriculum.stages.0.seq_lem=3", "seq_lem"),
    ("model=huge", "Could not find 'model/huge'"),
])
def test_typos_and_types_fail_at_composition(override, needle):
    with pytest.raises(ConfigCompositionException) as info:
        _compose(override)
    assert needle in _full_message(info.value)


@pytest.mark.parametrize("overrides,needle", [
    (["+optim.lrr=1"], "optim.lrr is not a key of optim (OptimConfig); valid keys: ['lr'"),
    (["+curriculum.stages.0.seq_lem=3"], "curriculum.stages[0].seq_lem is not a key"),
    (["model.num_key_value_heads=3"], "model.num_key_value_heads=3 must divide model.num_attention_heads=4"),
])
def test_schema_errors_name_the_key(overrides, needle):
    with pytest.raises(ConfigError) as info:
        to_object(_compose(*overrides))
    assert needle in str(info.value)


@pytest.mark.parametrize("overrides,dp,needle", [
    (["optim.schedule=linear"], 1, "optim.schedule='linear' is not allowed; choose one of ['cosine', 'wsd', 'constant']"),
    (["optim.warmup_steps=1000"], 1, "optim.warmup_steps=1000 must be in [0, train.max_steps=300]"),
    (["train.global_batch_tokens=512"], 1, "seq_len(128) * micro_batch_size(8) * dp(1) = 1024 tokens, more than train.global_batch_tokens=512"),
    ([], 3, "train.global_batch_tokens=4096 is not a multiple of seq_len(128) * micro_batch_size(8) * dp(3) = 3072"),
    (["logging.wandb.mode=sometimes"], 1, "logging.wandb.mode='sometimes' is not allowed"),
    (["checkpoint.signals=[SIGKILL]"], 1, "checkpoint.signals[]='SIGKILL' is not allowed"),
    (["data.readers=2", "train.global_batch_tokens=4096"], 4,
     "data.readers=2 but the 4 data-parallel ranks need one reader each; fix: data.readers >= 4"),
    (["curriculum.stages=[{seq_len: 64, micro_batch_size: 2, steps: 5}, {seq_len: 100, micro_batch_size: 1}]",
      "train.global_batch_tokens=256"], 1,
     "(e.g. global_batch_tokens=3200, a multiple of every stage)"),  # 3200 = lcm(128, 100): fits both stages
    (["data.validation_fraction=0"], 1, "train.eval_every=100 but data.validation_fraction=0 and "
                                        "data.validation_sources=[]: there is no validation split"),
])
def test_impossible_combinations(overrides, dp, needle):
    with pytest.raises(ConfigError) as info:
        validate_run(to_object(_compose(*overrides)), dp_size=dp)
    assert needle in str(info.value)


def test_no_validation_split_is_fine_without_validation():
    validate_run(to_object(_compose("data.validation_fraction=0", "train.eval_every=0")), dp_size=1)
    validate_run(to_object(_compose("data.validation_fraction=0", "data.validation_sources=[{path: v.txt}]")), 1)


def test_model_presets_match_jamba_presets():
    for name in ("tiny", "small", "bench-3b", "jamba-v0.1"):
        assert to_object(_compose(f"model={name}")).model == get_preset(name)


@pytest.mark.parametrize("overrides,world", [
    ([], 1), (["experiment=debug"], 1), (["experiment=bench_3b"], 8), (["curriculum=long_context", "model=jamba-v0.1", "parallel=fsdp", "parallel.tp=8"], 32),
    (["optim=adamw_wsd", "logging=quiet"], 1),
    (["experiment=long_context_2gpu"], 2),
    (["experiment=gpu_small"], 1), (["experiment=gpu_small"], 8), (["experiment=gpu_small"], 16),
])
def test_shipped_recipes_validate(overrides, world):
    from trainer.build import Layout

    cfg = to_object(_compose(*overrides))
    layout = Layout(cfg.parallel, world, cfg.model, [s.seq_len for s in cfg.curriculum.stages])
    validate_run(cfg, layout.dp_size)


def test_bad_layout_fails_before_any_process_group(tmp_path, monkeypatch):
    def no_group(*a, **k):
        raise AssertionError("init_process_group must not be reached")

    monkeypatch.setattr(dist, "init_process_group", no_group)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match=r"WORLD_SIZE\(2\) is not divisible by .* tp\(3\)"):
        train.run(_compose("parallel.tp=3", "parallel.dp_shard=-1"), str(tmp_path))
    with pytest.raises(ConfigError, match=r"dp\(2\)"):  # 4096 tokens / (128 x 8 x 2 ranks) is fine; 8 x 512 x 2 is not
        train.run(_compose("curriculum.stages.0.seq_len=512", "parallel.dp_shard=-1"), str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()


def test_cli_config_error_exit_code(tmp_path):
    import subprocess
    import sys

    root = Path(CONF).parent
    r = subprocess.run([sys.executable, "train.py", f"hydra.run.dir={tmp_path}", "optim.schedule=linear"],
                       cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "config error: optim.schedule='linear' is not allowed" in r.stdout + r.stderr
