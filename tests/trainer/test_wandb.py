"""wandb through MetricsLogger, for real (offline mode, files in a temporary run directory): the run's files
appear on disk with the logged metrics, a resumed run keeps the same wandb run id, and a failing
`wandb.init` is reported loudly once (never silently, never stopping training)."""

import logging
import string
import time

import pytest

from trainer.config import LoggingConfig
from trainer.metrics import MetricsLogger, new_wandb_run_id

wandb = pytest.importorskip("wandb")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    # wandb writes its own settings/cache under these; keep the user's home untouched
    for var in ("WANDB_API_KEY", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path / "run"


def _train_records(logger, steps):
    for step in steps:
        logger.log({"step": step, "tokens": 64 * step, "loss": 7.0 - 0.1 * step, "lr": 1e-3, "grad_norm": 1.0,
                    "tokens_per_s": 1000.0, "mem_gb": 0.1})


def _run_files(run_dir, run_id):
    """wandb's offline run directories of `run_id` (one per init) and their binary transaction logs."""
    dirs = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    return dirs, [d / f"run-{run_id}.wandb" for d in dirs]


def _close_and_flush(logger):
    """`run.finish()` only tells wandb's service process that the run is done; the service writes the rest of
    the run's transaction log when it closes the stream, after finish has returned (on CI the file once held
    just its header when read). MetricsLogger.close waits for that (wandb.teardown), since train.py skips
    atexit handlers after a gloo run; nothing else may be needed before reading the files."""
    logger.close()


def test_wandb_offline_run_is_written_and_resumed(offline):
    run_dir = offline
    run_dir.mkdir()
    cfg = LoggingConfig(progress_bar=False)  # mode auto -> $WANDB_MODE = offline
    logger = MetricsLogger(run_dir, cfg, is_main=True, total_steps=6, config_dict={"optim": {"lr": 1e-3}})
    assert logger.wandb is not None, "wandb did not initialise (see the warning in the log)"
    run_id = (run_dir / "wandb_id").read_text().strip()
    assert logger.wandb.id == run_id
    _train_records(logger, [1, 2, 3])
    logger.log_eval({"step": 3, "val_loss": 6.5, "val_ppl": 665.1})
    _close_and_flush(logger)

    dirs, logs = _run_files(run_dir, run_id)
    assert len(dirs) == 1 and logs[0].is_file(), sorted(p.name for p in (run_dir / "wandb").iterdir())
    data = logs[0].read_bytes()
    for key in (b"loss", b"grad_norm", b"val_loss"):  # the records went into wandb's run log
        assert key in data, key

    # a resumed job (same run directory) continues the same wandb run; wandb names an offline run's directory by
    # the second it started, and a real resume is seconds later: so is this one
    time.sleep(1.1)
    logger = MetricsLogger(run_dir, cfg, is_main=True, total_steps=6, start_step=3)
    assert logger.wandb is not None and logger.wandb.id == run_id
    _train_records(logger, [4, 5, 6])
    _close_and_flush(logger)
    dirs, logs = _run_files(run_dir, run_id)
    assert len(dirs) == 2 and all(p.is_file() for p in logs), dirs
    assert b"grad_norm" in logs[1].read_bytes()
    assert (run_dir / "wandb_id").read_text().strip() == run_id


def test_wandb_init_failure_is_loud_and_once(offline, monkeypatch, caplog):
    run_dir = offline
    run_dir.mkdir()

    def broken_init(**_kw):
        raise AttributeError("module 'wandb.util' has no attribute 'generate_id'")

    monkeypatch.setattr(wandb, "init", broken_init)
    with caplog.at_level(logging.WARNING, logger="trainer.metrics"):
        logger = MetricsLogger(run_dir, LoggingConfig(progress_bar=False), is_main=True, total_steps=3)
        _train_records(logger, [1, 2, 3])  # training goes on, without repeating the warning
        logger.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    msg = warnings[0]
    assert "WANDB IS OFF" in msg and "AttributeError" in msg and "generate_id" in msg
    assert "logging.wandb.mode=disabled" in msg and "pip install" in msg
    assert (run_dir / "metrics.jsonl").read_text().count("\n") == 3


def test_wandb_disabled_creates_nothing(offline):
    run_dir = offline
    run_dir.mkdir()
    cfg = LoggingConfig(progress_bar=False)
    cfg.wandb.mode = "disabled"
    logger = MetricsLogger(run_dir, cfg, is_main=True, total_steps=1)
    logger.close()
    assert logger.wandb is None and not (run_dir / "wandb").exists() and not (run_dir / "wandb_id").exists()


def test_run_ids_are_wandb_safe_and_distinct():
    ids = {new_wandb_run_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(len(i) == 8 and set(i) <= set(string.ascii_lowercase + string.digits) for i in ids)


def test_online_without_an_api_key_names_that_fix(tmp_path, monkeypatch, caplog):
    """A real wandb.init online with no key (no network needed: wandb refuses at once) says to log in or go
    offline, not to reinstall the package."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a key
    monkeypatch.setenv("WANDB_MODE", "online")
    cfg = LoggingConfig(progress_bar=False)
    cfg.wandb.mode, cfg.wandb.init_timeout_s = "online", 5
    (tmp_path / "run").mkdir()
    with caplog.at_level(logging.WARNING, logger="trainer.metrics"):
        logger = MetricsLogger(tmp_path / "run", cfg, is_main=True, total_steps=1)
        logger.close()
    msg = " ".join(r.getMessage() for r in caplog.records if "WANDB IS OFF" in r.getMessage())
    assert "No API key" in msg and "Fix: `wandb login` or set WANDB_API_KEY" in msg, msg
    assert "logging.wandb.mode=offline" in msg and "pip install" not in msg, msg
