"""Pretrain a Jamba-style hybrid LM.  `python train.py` trains the tiny model on the embedded corpus (CPU).

    python train.py model=small optim.lr=1e-3                  # Hydra overrides (conf/ lists the groups)
    torchrun --nproc_per_node 2 train.py parallel=fsdp         # several processes (gloo on CPU, NCCL on GPU)
    python train.py -m optim.lr=1e-3,3e-4                      # a sweep: one run directory per point

The run directory (Hydra's output dir, runs/<name>/<leaf>: trainer/rundir.py names it from the overrides that
define the run) holds the resolved config, metrics.jsonl, checkpoints and the tokenizer; running the same
command again resumes from its newest complete checkpoint (also with a larger train.max_steps).
The command line is checked first (trainer/preflight.py): a config problem is one line and exit code 2, before
anything is built and before the run directory exists.
Exit codes: 0 done, 2 config error, 75 checkpointed after SIGTERM/SIGINT/SIGUSR1 (re-run to resume), 1 error.
"""

import logging
import os
import sys

# First thing, before Hydra, the command line's check and torch are imported (seconds): a SIGTERM/SIGINT/SIGUSR1
# from here on ends in a checkpoint after the first step and exit 75, not in death by -15. main() hands over to
# checkpoint.signals. Only for a run of this script (tests import it), and not for a sweep's submitter.
if __name__ == "__main__":
    from trainer.signals import catch_early

    catch_early(sys.argv[1:])

# Less fragmentation at long context (measured on H100 with launch/bench.py: the longest trainable
# bench-3b sequence went from 131,072 to 196,608 tokens). Before torch is imported; a user's value wins.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from trainer.config import register_configs, to_object, validate_run
from trainer.rundir import register_resolvers, warn_config_changes

log = logging.getLogger("train")
register_configs()
register_resolvers()  # ${run_leaf:...} in conf/config.yaml's hydra.run.dir


def run(dcfg: DictConfig, run_dir: str, stop=None) -> int:
    import torch

    from trainer import build, distributed
    from trainer.checkpoint import PREFIX as CKPT_PREFIX
    from trainer.checkpoint import CheckpointManager
    from trainer.curriculum import Curriculum
    from trainer.data_fingerprint import data_fingerprint
    from trainer.loop import Trainer
    from trainer.metrics import MetricsLogger, gpu_peak_tflops
    from trainer.optim import build_optimizer

    # 1. Validate everything before any process group exists.
    cfg, world = to_object(dcfg), distributed.world_from_env()
    t = cfg.train
    layout = build.Layout(cfg.parallel, world.world_size, cfg.model, [s.seq_len for s in cfg.curriculum.stages])
    validate_run(cfg, layout.dp_size)
    device = distributed.resolve_device(t.device, world)
    curriculum = Curriculum(cfg.curriculum, t.global_batch_tokens, t.max_steps, layout.dp_size)

    metrics = ckpt = None
    distributed.init_distributed(world, device, t.collective_timeout_s)
    from trainer.watchdog import make_watchdog

    watchdog = make_watchdog(world.rank, world.world_size, t.collective_timeout_s)  # hangs become errors
    try:
        run_path = Path(run_dir)
        if world.is_main:
            run_path.mkdir(parents=True, exist_ok=True)
            # before anything is built: a change that makes the restore fail (a model shape) is named first
            warn_config_changes(run_path, OmegaConf.to_container(dcfg, resolve=True))
            if not (run_path / "config.yaml").is_file():  # a new run: its config at once (a resume's: below)
                OmegaConf.save(dcfg, run_path / "config.yaml", resolve=True)
        # 2. Model: meta -> to_empty -> init_weights (same seed on every rank) -> parallel layout.
        torch.use_deterministic_algorithms(t.deterministic)
        if t.num_threads:
            torch.set_num_threads(t.num_threads)
        build.seed_everything(t.seed)
        model = layout.build_model(cfg.model, device, t.seed, t.sharded_init)
        compiled = t.compile if t.compile is not None else device.type == "cuda"
        if compiled:
            from parallel.compile import apply_compile

            apply_compile(model)
        build.seed_everything(t.seed + world.rank)  # runtime randomness differs per rank
        tok, make_loader, make_eval = build.build_data(cfg, run_path, layout.dp_rank, layout.dp_size, world.is_main)
        optimizer = build_optimizer(model, cfg.optim, device.type)
        ckpt = CheckpointManager(run_path, cfg.checkpoint, world, data_fingerprint(cfg.data, tok), device.type)
        flops = None
        try:
            from jamba.flops import flops_per_token
            flops = lambda seq_len: flops_per_token(cfg.model, seq_len)  # noqa: E731
        except ImportError:
            pass
        trainer = Trainer(cfg, model, optimizer, curriculum, make_loader, make_eval, ckpt, None, world, device,
                          layout.dp_size, flops_per_token=flops,
                          peak_tflops=gpu_peak_tflops(device, cfg.logging.peak_tflops), watchdog=watchdog,
                          dp_rank=layout.dp_rank)
        trainer.stop, trainer.compiled = stop, compiled
        resumed = trainer.restore()
        if world.is_main:
            if resumed:
                log.info("run directory %s: resuming from %s (step %d of %d)", run_path,
                         ckpt.root / f"{CKPT_PREFIX}{trainer.state.step:09d}", trainer.state.step, t.max_steps)
            else:
                log.info("run directory %s: starting fresh (no checkpoint%s)", run_path,
                         "" if cfg.checkpoint.resume else ": checkpoint.resume=false")
            # a resume's only once its restore worked: config.yaml describes the start that runs (jamba.hf and
            # launch.ep_balance read it, the next start compares with it)
            OmegaConf.save(dcfg, run_path / "config.yaml", resolve=True)
        metrics = MetricsLogger(run_path, cfg.logging, world.is_main, t.max_steps, trainer.state.step,
                                OmegaConf.to_container(dcfg, resolve=True))
        trainer.metrics = metrics
        # 3. Train.
        return trainer.fit()
    finally:
        if metrics is not None:
            metrics.close()
        if ckpt is not None:
            ckpt.close()  # waits for a background save, releases the run directory's lock
        distributed.destroy_distributed()
        watchdog.close()


@hydra.main(config_path="conf", config_name="config", version_base=None)
def main(dcfg: DictConfig) -> None:
    from jamba.config import ConfigError
    from trainer.checkpoint_integrity import CheckpointDiskFull
    from trainer.config import SIGNALS
    from trainer.signals import hand_over, watch_launcher

    # Names the config does not allow are reported by validation. A signal caught since train.py's first lines
    # carries over when the config saves on it.
    stop = hand_over([s for s in dcfg.checkpoint.signals if s in SIGNALS])
    if "TORCHELASTIC_RUN_ID" in os.environ:  # under torchrun: stop when the agent dies (kill -9 of torchrun)
        watch_launcher(float(os.environ.get("JAMBA_ORPHAN_GRACE_S", "300")))
    try:
        code = run(dcfg, HydraConfig.get().runtime.output_dir, stop)
    except ConfigError as e:  # a user mistake: the message names the key, the value and the fix
        log.error("config error: %s", e)
        sys.exit(2)
    except CheckpointDiskFull as e:  # says how much space a checkpoint needs; older checkpoints are intact
        log.error("%s", e)
        sys.exit(1)
    finally:
        stop.restore()
    if code:
        sys.exit(code)


if __name__ == "__main__":
    from trainer.preflight import preflight_or_exit

    preflight_or_exit(sys.argv[1:])  # one line and exit 2 on a config problem, before Hydra starts the job
    try:
        main()
        exit_code = 0
    except SystemExit as e:  # ours (75, 2, 1) and Hydra's (1 after printing an exception)
        exit_code = e.code
    except BaseException as e:  # HYDRA_FULL_ERROR=1, or a Ctrl-C outside the trainer's signal handling
        import traceback

        traceback.print_exc()
        exit_code = 130 if isinstance(e, KeyboardInterrupt) else 1
    from trainer.distributed import exit_process

    exit_process(exit_code)  # after gloo: skips the teardown where its worker threads can abort the process
