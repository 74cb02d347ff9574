"""Typed schemas of the training run's Hydra config groups, and the checks that run before any process group.

Every group of `conf/` is merged onto these dataclasses (registered in Hydra's ConfigStore as `run_schema`,
the first entry of `conf/config.yaml`'s defaults list), so a typo (`optim.lrr=...`) or a wrong type
(`optim.lr=fast`) fails while Hydra composes the config. `validate_run(cfg, world_size)` then checks the
combinations (curriculum vs global batch vs data-parallel size, schedule lengths, model vs mesh) and raises
`ConfigError` naming the key, the value and what is allowed -- before `init_process_group` is called.

Groups owned elsewhere: `model` is `jamba.config.JambaConfig` (MODEL/lead), `parallel` is
`parallel.config.ParallelConfig` (PARALLEL) and `data` is DATA's schema (`data.DataConfig`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, List, Optional

from omegaconf import MISSING

from jamba.config import ConfigError, JambaConfig
from trainer.signals import DEFAULT_SIGNALS

try:  # PARALLEL's schema (conf/parallel/*.yaml); a plain dict until it lands
    from parallel.config import ParallelConfig  # type: ignore
except ImportError:  # pragma: no cover - only while parallel/ is being written
    ParallelConfig = None  # type: ignore
try:  # DATA's schema (conf/data/*.yaml)
    from data.config import DataConfig  # type: ignore
except ImportError:  # pragma: no cover
    DataConfig = None  # type: ignore

SCHEDULES = ("cosine", "wsd", "constant")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
WANDB_MODES = ("auto", "online", "offline", "disabled")
SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP")


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule (the schedule is a pure function of the optimizer step)."""

    lr: float = 3e-3
    """Peak learning rate (reached at the end of warmup)."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of `lr` (cosine floor / WSD end point)."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied only where `JambaForCausalLM.weight_decay_filter` says (matrices)."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping (the norm is still logged)."""
    schedule: str = "cosine"
    """cosine (warmup + cosine to min_lr), wsd (warmup-stable-decay) or constant (warmup then flat)."""
    warmup_steps: int = 20
    """Linear warmup from 0 over this many optimizer steps."""
    decay_fraction: float = 0.2
    """WSD only: the last fraction of all steps decays linearly from lr to min_lr."""
    fused: Optional[bool] = None
    """Fused AdamW kernel; None = fused on CUDA, foreach elsewhere."""


@dataclass
class StageConfig:
    """One curriculum stage. Its length is `steps` or `tokens` (one of them; the last stage may give neither
    and then runs until `train.max_steps`)."""

    seq_len: int = 256
    micro_batch_size: int = 4
    """Sequences per data-parallel rank per micro-batch (forward/backward)."""
    steps: Optional[int] = None
    tokens: Optional[int] = None
    """Length in training tokens, rounded up to whole steps of train.global_batch_tokens."""


@dataclass
class CurriculumConfig:
    """Context-length curriculum: stages run in order; tokens per optimizer step stay constant
    (`train.global_batch_tokens`), so gradient accumulation = global / (seq_len * micro_batch * dp)."""

    stages: List[StageConfig] = field(default_factory=lambda: [StageConfig()])


@dataclass
class TrainConfig:
    max_steps: int = 300
    """Optimizer steps of the whole run (all curriculum stages)."""
    global_batch_tokens: int = 4096
    """Tokens per optimizer step over all data-parallel ranks and micro-batches (constant across stages)."""
    seed: int = 1234
    """Seeds weights, data order and every RNG (per rank: seed + rank for dropout-like randomness; a resume on
    another number of ranks seeds each rank's streams from (seed, step, rank), trainer/checkpoint.py)."""
    device: str = "auto"
    """auto (cuda when available), cpu or cuda."""
    precision: str = "auto"
    """auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16."""
    eval_every: int = 100
    """Validation loss/perplexity on the held-out split every N steps (and at the end); 0 disables."""
    eval_batches: int = 4
    """Micro-batches per rank per validation."""
    max_consecutive_nonfinite: int = 5
    """A non-finite loss or gradient skips the step; this many in a row halt the run."""
    num_threads: Optional[int] = None
    """CPU threads per process for intra-op parallelism (torch.set_num_threads); None = torch's default
    (OMP_NUM_THREADS, else the core count). Small models on CPU run fastest with 1."""
    sharded_init: Optional[bool] = None
    """Initialise the weights after sharding (meta -> parallelize -> to_empty -> init_weights) instead of
    before (every rank initialises the full model, then it is sharded). Needed when the model does not fit
    on one device. Both give every layout exactly the single-process initial weights while one fp32 copy of
    the model is at most 8 GiB (parallel/init.py); beyond that sharded init draws each shard with its own seed.
    null (default) = sharded when there are several ranks and one fp32 copy of the model would take over a
    quarter of a GPU's memory (over 8 GiB on CPU): jamba-v0.1 (192 GiB) is, bench-3b (11 GiB) is not."""
    compile: Optional[bool] = None
    """torch.compile each decoder layer and the loss chunks (parallel/compile.py). null (default) = on for
    CUDA, off on CPU. On GPUs it fuses the element-wise work between the kernels (bench-3b on one H100: about
    7% more tokens/s, see docs/performance.md); the first step pays the compilation (about a
    minute). On CPU the tiny models gain little for the compile time and Inductor needs a C++ compiler."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms(True) (CPU runs are deterministic anyway)."""
    gc_freeze: bool = True
    """After the first training step and the first validation of each curriculum stage (when torch.compile
    has built the stage's graphs and the optimizer its states), collect garbage once and move every live object to the collector's permanent generation
    (gc.freeze): later full collections walk only the objects created since. On 2 H200s (bench-3b, EP, eager)
    a full collection stopped rank 0 for 407 ms and made its logging window 31% slower (the `gc_ms` metric);
    frozen objects are still freed by reference counting, only reference cycles among them are not."""
    collective_timeout_s: float = 600.0
    """Seconds a rank waits in a collective for the others (the process group's timeout) before the run
    fails with an error naming the rank that stopped and the operation (trainer/watchdog.py); a rank making
    no progress for twice this long is ended. Must exceed the longest time one rank can legitimately lag
    the others (a compilation, a checkpoint write)."""


@dataclass
class WandbConfig:
    mode: str = "auto"
    """auto (WANDB_MODE if set, else online when WANDB_API_KEY is set, else offline), online, offline, disabled."""
    project: str = "jamba"
    entity: Optional[str] = None
    name: Optional[str] = None
    """Display name; None = the run directory's name."""
    tags: List[str] = field(default_factory=list)
    init_timeout_s: float = 30.0
    """Online mode: give up (and log offline-less, i.e. disabled) after this long rather than block."""


@dataclass
class LoggingConfig:
    log_every: int = 10
    """A log line (rank 0) and a metrics.jsonl record every N steps."""
    progress_bar: Optional[bool] = None
    """tqdm progress bar with ETA on rank 0. null (default) = when rank 0's stderr is a terminal: in a batch or
    SLURM log its redraws would be noise (the log lines say the same); true forces it, false turns it off."""
    peak_tflops: Optional[float] = None
    """Peak dense bf16 TFLOP/s of one accelerator for MFU; None = looked up from the GPU name."""
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class CheckpointConfig:
    every: int = 100
    """Save every N optimizer steps (0 = only at the end and on signals)."""
    keep_last: int = 3
    """Keep the newest K complete checkpoints (older ones are deleted after a successful save)."""
    save_final: bool = True
    resume: bool = True
    """Resume automatically from the newest complete, intact checkpoint in the run directory. false in a
    run directory that already holds checkpoints or metrics is refused unless `overwrite` is true."""
    overwrite: bool = False
    """Start afresh in a run directory that holds an earlier run: its checkpoints/ and metrics.jsonl are moved
    to <run dir>/previous-<UTC time>/ first (nothing is deleted). Implies no resume."""
    allow_data_change: bool = False
    """Resume although the data no longer matches the checkpoint's (another corpus, tokenizer, file list or
    loader setting, or another number of ranks whose loader positions cannot be mapped): the data stream
    then differs from the interrupted run's. Refused by default, naming what changed."""
    async_save: Optional[bool] = None
    """Write checkpoints in the background: the state is copied to CPU memory (pinned on CUDA), training
    goes on while a thread writes it; COMPLETE comes only after every rank's write ended, and the next save
    (or the end of the run) waits for it. null = on for CUDA, off on CPU."""
    verify: bool = True
    """Check every file of a checkpoint against its recorded CRC32 before loading it (a corrupt one is
    skipped, loudly, for the newest intact one). Reads each file once."""
    signals: List[str] = field(default_factory=lambda: list(DEFAULT_SIGNALS))
    """On these signals: finish the current step, save, exit with code 75 (EXIT_PREEMPTED; requeue)."""


_DataT = DataConfig if DataConfig is not None else Any  # typed once the owners' schemas exist
_ParallelT = ParallelConfig if ParallelConfig is not None else Any


@dataclass
class RunConfig:
    """The whole run: `python train.py` composes conf/config.yaml onto this."""

    name: str = "default"
    """Names the run directory (runs/<name>/<overrides>); re-running the same command resumes there."""
    model: JambaConfig = field(default_factory=JambaConfig)
    data: _DataT = (field(default_factory=DataConfig) if DataConfig is not None else MISSING)
    parallel: _ParallelT = (field(default_factory=ParallelConfig) if ParallelConfig is not None else MISSING)
    optim: OptimConfig = field(default_factory=OptimConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


def register_configs() -> None:
    """Register the schema in Hydra's ConfigStore (conf/config.yaml lists `run_schema` first)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _one_of(key: str, value: Any, allowed) -> None:
    _need(value in allowed, f"{key}={value!r} is not allowed; choose one of {list(allowed)}")


def validate_run(cfg: RunConfig, dp_size: int) -> None:
    """Check everything that does not need a process group. `dp_size`: data-parallel ranks (batch shards)."""
    o, t, lg, ck = cfg.optim, cfg.train, cfg.logging, cfg.checkpoint
    _need(o.lr > 0, f"optim.lr={o.lr} must be > 0")
    _need(0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")
    _need(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay} must be >= 0")
    _need(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, f"optim.beta1={o.beta1}, optim.beta2={o.beta2} must be in [0, 1)")
    _need(o.eps > 0, f"optim.eps={o.eps} must be > 0 (it keeps Adam's update finite where the second moment is 0; "
          "e.g. 1e-8)")
    _need(o.grad_clip >= 0, f"optim.grad_clip={o.grad_clip} must be >= 0 (0 disables clipping)")
    _one_of("optim.schedule", o.schedule, SCHEDULES)
    _need(t.max_steps > 0, f"train.max_steps={t.max_steps} must be > 0")
    _need(0 <= o.warmup_steps <= t.max_steps,
          f"optim.warmup_steps={o.warmup_steps} must be in [0, train.max_steps={t.max_steps}]")
    _need(0 < o.decay_fraction <= 1, f"optim.decay_fraction={o.decay_fraction} must be in (0, 1]")
    _one_of("train.device", t.device, DEVICES)
    _one_of("train.precision", t.precision, PRECISIONS)
    _need(t.eval_every >= 0, f"train.eval_every={t.eval_every} must be >= 0 (0 disables validation)")
    _need(t.num_threads is None or t.num_threads > 0, f"train.num_threads={t.num_threads} must be > 0 or null")
    _need(t.eval_batches > 0, f"train.eval_batches={t.eval_batches} must be > 0")
    _need(t.collective_timeout_s > 0, f"train.collective_timeout_s={t.collective_timeout_s} must be > 0 seconds "
                                      f"(the default 600 fits most runs)")
    _need(t.max_consecutive_nonfinite > 0,
          f"train.max_consecutive_nonfinite={t.max_consecutive_nonfinite} must be > 0")
    _need(lg.log_every > 0, f"logging.log_every={lg.log_every} must be > 0")
    _one_of("logging.wandb.mode", lg.wandb.mode, WANDB_MODES)
    _need(ck.every >= 0, f"checkpoint.every={ck.every} must be >= 0 (0 = only final and on signals)")
    _need(ck.keep_last >= 1, f"checkpoint.keep_last={ck.keep_last} must be >= 1")
    for s in ck.signals:
        _one_of("checkpoint.signals[]", s, SIGNALS)
    if t.eval_every and not getattr(cfg.data, "validation_sources", None):
        _need((getattr(cfg.data, "validation_fraction", 0.0) or 0.0) > 0,
              f"train.eval_every={t.eval_every} but data.validation_fraction=0 and data.validation_sources=[]: there "
              f"is no validation split; fix: data.validation_fraction=0.02 (held-out files of the sources), "
              f"data.validation_sources=[...], or train.eval_every=0 (no validation)")
    readers = getattr(cfg.data, "readers", 0) or 0
    _need(readers == 0 or readers >= dp_size,
          f"data.readers={readers} but the {dp_size} data-parallel ranks need one reader each; fix: data.readers >= "
          f"{dp_size}, or 0 (data-parallel ranks x data.num_workers)")
    validate_curriculum(cfg.curriculum, t.global_batch_tokens, t.max_steps, dp_size)


def validate_curriculum(cur: CurriculumConfig, global_batch_tokens: int, max_steps: int, dp_size: int) -> None:
    """Tokens per step constant across stages: seq_len * micro_batch * dp * accum == global_batch_tokens."""
    _need(len(cur.stages) > 0, "curriculum.stages is empty; give at least one stage")
    _need(global_batch_tokens > 0, f"train.global_batch_tokens={global_batch_tokens} must be > 0")
    for i, s in enumerate(cur.stages):
        _need(s.seq_len > 0, f"curriculum.stages[{i}].seq_len={s.seq_len} must be > 0")
        _need(s.micro_batch_size > 0, f"curriculum.stages[{i}].micro_batch_size={s.micro_batch_size} must be > 0")
    # a suggested global batch must suit every stage: a multiple of all their micro-batches over the ranks
    every = math.lcm(*(s.seq_len * s.micro_batch_size * dp_size for s in cur.stages))
    for i, s in enumerate(cur.stages):
        key = f"curriculum.stages[{i}]"
        per_micro = s.seq_len * s.micro_batch_size * dp_size
        _need(per_micro <= global_batch_tokens,
              f"{key}: one micro-batch over all data-parallel ranks is seq_len({s.seq_len}) * micro_batch_size("
              f"{s.micro_batch_size}) * dp({dp_size}) = {per_micro} tokens, more than train.global_batch_tokens="
              f"{global_batch_tokens}; lower micro_batch_size or raise global_batch_tokens")
        _need(global_batch_tokens % per_micro == 0,
              f"{key}: train.global_batch_tokens={global_batch_tokens} is not a multiple of seq_len({s.seq_len}) * "
              f"micro_batch_size({s.micro_batch_size}) * dp({dp_size}) = {per_micro}; pick values so that the "
              f"gradient accumulation count is a whole number (e.g. global_batch_tokens="
              f"{max(1, round(global_batch_tokens / every)) * every}"
              f"{', a multiple of every stage' if len(cur.stages) > 1 else ''})")
        _need(s.steps is None or s.tokens is None,
              f"{key}: give its length as steps ({s.steps}) or tokens ({s.tokens}), not both")
        if s.tokens is not None:
            _need(s.tokens >= global_batch_tokens,
                  f"{key}.tokens={s.tokens} must be at least one step, train.global_batch_tokens="
                  f"{global_batch_tokens} (it is rounded up to whole steps)")
        if s.steps is not None:
            _need(s.steps > 0, f"{key}.steps={s.steps} must be > 0")
        if i < len(cur.stages) - 1:
            _need(s.steps is not None or s.tokens is not None,
                  f"{key} has no length (steps or tokens); only the last stage may run until train.max_steps")
    bounded = sum(stage_steps(s, global_batch_tokens) or 0 for s in cur.stages)
    _need(bounded <= max_steps,
          f"the curriculum's stages add up to {bounded} steps, more than train.max_steps={max_steps}; "
          "raise max_steps or shorten the stages")


def stage_steps(stage: StageConfig, global_batch_tokens: int) -> Optional[int]:
    if stage.steps is not None:
        return stage.steps
    if stage.tokens is not None:
        return -(-stage.tokens // global_batch_tokens)  # ceil
    return None


def to_object(cfg) -> RunConfig:
    """OmegaConf DictConfig -> RunConfig (dataclasses all the way down; JambaConfig validates itself)."""
    from omegaconf import OmegaConf

    obj = OmegaConf.to_object(cfg)
    if not isinstance(obj, RunConfig):  # composed without the schema (should not happen via train.py)
        raise ConfigError("the config was not composed onto trainer.config.RunConfig; keep `run_schema` "
                          "first in conf/config.yaml's defaults list")
    _check_keys(OmegaConf.to_container(cfg, resolve=True), obj, "")
    return obj


def _check_keys(plain: Any, obj: Any, path: str) -> None:
    """Keys added with Hydra's `+key=value` bypass the schema's struct mode: reject unknown ones here."""
    if dataclasses.is_dataclass(obj) and isinstance(plain, dict):
        names = [f.name for f in dataclasses.fields(obj)]
        for key in plain:
            if key not in names:
                raise ConfigError(f"{path}{key} is not a key of {path.rstrip('.') or 'the config'} "
                                  f"({type(obj).__name__}); valid keys: {names}")
        for name in names:
            _check_keys(plain.get(name), getattr(obj, name), f"{path}{name}.")
    elif isinstance(obj, list) and isinstance(plain, list):
        for i, (p, o) in enumerate(zip(plain, obj)):
            _check_keys(p, o, f"{path.rstrip('.')}[{i}].")


def as_dict(obj) -> dict:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else dict(obj)
