"""Pre-flight check of a training command line: everything that can be checked without building anything.

    python -m trainer.preflight [--world-size N] [--multirun] -- [train.py overrides ...]

It composes the config exactly as `train.py` would (Hydra's compose API, same conf/ and overrides), then checks
in order of cost: the override syntax, group options (`model=smal`), unknown keys (`optim.lrr=1`) and types
(`optim.lr=abc`), the typed schemas and their values (trainer.config.validate_run, DataConfig, JambaConfig), the
parallel layout against the world size (imports torch), and the data: every `path` source matches a file and
holds at least one usable document, the tokenizer file exists and fits model.vocab_size. Nothing is built
(no tokenizer training, no model, no data loader, no process group, no run directory).

A problem is ONE line on stderr (`config error: <key>=<value>: <what is allowed / the fix>`) and exit code 2.
Callers: `train.py` runs it before Hydra starts the job (so a run that fails validation leaves no directory;
also for `--cfg job` and for every point of a `-m` sweep); under torchrun only rank 0 prints (torchrun itself
then still prints its summary of the failed workers: use launch/single_node.sh or launch/multi_node.sh, which
run this check before starting torchrun); `python -m launch.slurm submit` runs it for the job's world size
before submitting.

Imports are lazy: composing and the schema checks need only Hydra/OmegaConf (a typo is reported in well under
a second of import time); torch is imported only for the layout check.
"""

from __future__ import annotations

import difflib
import itertools
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence, Union

from jamba.config import ConfigError

EXIT_CONFIG_ERROR = 2
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
MAX_SWEEP_POINTS = 64
NONZERO_RANK_WAIT_S = 30.0
DOC_SCAN_LIMIT = 2000
"""Raw documents read per `path` source to find a usable one (stops at the first usable document)."""


def one_line(text: str) -> str:
    return " ".join(str(text).split())


# ---- composing -----------------------------------------------------------------------------------
def compose(overrides: Sequence[str], config_name: str = "config"):
    """The run's DictConfig (with its `hydra` node) for these overrides, as train.py's Hydra job sees it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from trainer.config import register_configs
    from trainer.rundir import register_resolvers

    register_configs()
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return hydra_compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)


def _group_options(group: str) -> List[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _closest(word: str, options: Sequence[str]) -> str:
    near = difflib.get_close_matches(str(word), list(options), n=1, cutoff=0.6)
    return f"did you mean {near[0]!r}? " if near else ""


def _schema_keys(object_type) -> List[str]:
    import dataclasses

    return [f.name for f in dataclasses.fields(object_type)] if dataclasses.is_dataclass(object_type) else []


def _find_override(overrides: Sequence[str], key: Optional[str]) -> Optional[str]:
    if not key:
        return None
    for o in overrides:
        k = o.split("=", 1)[0].lstrip("+~")
        if k == key or key.startswith(k + "."):
            return o
    return None


def explain(exc: BaseException, overrides: Sequence[str]) -> str:
    """A composition / schema exception -> one line naming the override, the key, what is allowed."""
    from hydra.errors import MissingConfigException, OverrideParseException

    text = str(exc)
    if isinstance(exc, ConfigError):
        return one_line(text)
    if isinstance(exc, OverrideParseException):
        bad = next((o for o in overrides if _syntax_error(o)), None)
        where = f"{bad!r}: " if bad else ""
        key, _, value = (bad or "").partition("=")
        if value and not value.startswith(("'", '"', "[", "{")) and re.search(r"[=,]", value):
            # e.g. a run directory named by trainer/rundir.py (`parallel=fsdp-<hash>`): Hydra reads '=' and ','
            return one_line(f"{where}not a valid override ({text.splitlines()[0]}); a value holding '=' or ',' "
                            f"must be quoted for Hydra inside the shell's quotes: \"{key}='{value}'\"")
        return one_line(f"{where}not a valid override ({text.splitlines()[0]}); write key=value, quote lists "
                        "and braces for the shell, e.g. 'data.sources=[{path: corpus/*.jsonl}]'")
    if isinstance(exc, MissingConfigException):
        m = re.search(r"Could not find '([^']+)/([^']+)'", text)
        if m:
            group, value = m.group(1), m.group(2)
            options = _group_options(group)
            article = "an" if group[0] in "aeiou" else "a"
            return (f"{group}={value!r} is not {article} {group} option: {_closest(value, options)}"
                    f"choose one of {options} (files in conf/{group}/)")
        return one_line(text.split("Config search path")[0])
    cause = exc.__cause__ or exc.__context__
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)):
        m = re.search(r"Could not override '([^']+)'", text)
        full_key = m.group(1) if m else getattr(cause, "full_key", None)
        bad_key = str(getattr(cause, "key", None) or (full_key or "").rsplit(".", 1)[-1])
        valid = _schema_keys(getattr(cause, "object_type", None))
        where = getattr(getattr(cause, "object_type", None), "__name__", "the config")
        override = _find_override(overrides, full_key) or full_key
        return (f"{override}: {bad_key!r} is not a key of {where}; {_closest(bad_key, valid)}"
                f"valid keys: {valid}")
    if isinstance(cause, ValidationError):
        full_key = getattr(cause, "full_key", None)
        override = _find_override(overrides, full_key) or full_key
        msg = one_line(str(getattr(cause, "msg", cause)).split("full_key:")[0])
        m = re.search(r"could not be converted to (\w+)", msg)
        if m:
            kind = {"Float": "a number, e.g. 3e-4", "Integer": "an integer", "Boolean": "true or false"}.get(
                m.group(1), m.group(1))
            msg += f"; give {kind}"
        return f"{override}: {msg}"
    if isinstance(exc, OmegaConfBaseException) or isinstance(cause, OmegaConfBaseException):
        err = cause if isinstance(cause, OmegaConfBaseException) else exc
        return one_line(str(getattr(err, "msg", err)).split("full_key:")[0])
    if isinstance(exc, ValueError):  # the schemas' own __post_init__ checks (DataConfig, ParallelConfig, ...)
        return one_line(text)
    return one_line(f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}")


def _syntax_error(override: str) -> bool:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        OverridesParser.create().parse_overrides([override])
        return False
    except Exception:  # noqa: BLE001
        return True


# ---- checks --------------------------------------------------------------------------------------
def run_config(dcfg):
    """train.py's typed RunConfig from a composed DictConfig (its `hydra` node, if any, left out)."""
    from omegaconf import OmegaConf, open_dict

    from trainer.config import to_object

    dcfg = dcfg.copy()
    if "hydra" in dcfg:
        with open_dict(dcfg):
            del dcfg["hydra"]
    OmegaConf.set_readonly(dcfg, False)
    return to_object(dcfg)


def check_config(dcfg, world_size: int, data: bool = True):
    """Schema, values, parallel layout (for `world_size` processes) and data inputs. Returns the RunConfig and
    its data-parallel size on `world_size` processes."""
    from trainer.config import validate_run

    cfg = run_config(dcfg)
    seq_len = max(s.seq_len for s in cfg.curriculum.stages) if cfg.curriculum.stages else None
    from parallel.config import ParallelConfig
    from parallel.dims import ParallelDims  # imports torch: only once the cheap checks passed

    pcfg = cfg.parallel if isinstance(cfg.parallel, ParallelConfig) else ParallelConfig(**dict(cfg.parallel))
    try:
        dims = ParallelDims(pcfg, world_size, model=cfg.model, seq_len=seq_len)
    except ConfigError as world_error:
        # Advice must fix it: if the layout cannot work for this model on the world size it asks for either
        # (parallel.tp=3 with 4 heads), that is the problem to report, not the number of processes.
        # Only for a process-count mismatch, and only a tensor-parallel problem of the model is taken from that
        # check (other degrees, e.g. ep against a filled dp_shard, depend on the real world size).
        fit = 1
        for degree in (pcfg.dp_replicate, pcfg.dp_shard, pcfg.cp, pcfg.tp):
            fit *= max(degree, 1)
        if "WORLD_SIZE(" in str(world_error) and fit != world_size:
            try:
                ParallelDims(pcfg, fit, model=cfg.model, seq_len=seq_len)
            except ConfigError as model_error:
                if str(model_error).startswith("parallel.tp="):
                    raise model_error from None
        raise world_error
    validate_run(cfg, dims.dp_size)
    if data:
        check_data(cfg)
    return cfg, dims.dp_size


def choices_note(overrides: Sequence[str], dcfg) -> Optional[str]:
    """A warning for group choices whose settings the experiment recipe replaces (`overridden_choices`). Not an
    error: a recipe may tune a chosen group on purpose (bench_3b sets parallel.reduce_dtype for any layout)."""
    lost = overridden_choices(overrides, dcfg)
    return (f"{'; '.join(lost)}. To use the group's values, drop the recipe ('~experiment', then give the "
            f"settings you want from it) or give those keys on the command line") if lost else None


def overridden_choices(overrides: Sequence[str], dcfg) -> List[str]:
    """A curriculum chosen on the command line (`curriculum=long_context`) whose settings the experiment recipe,
    composed after the groups, replaced: one description per such group. An experiment file may set a group's
    keys directly (cpu_demo sets curriculum.stages and train.global_batch_tokens), so a choice made beside it
    lost those settings without a word (curriculum=long_context trained 300 steps at 128 tokens)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    # Only the curriculum: a recipe's curriculum (stages, tokens per step, steps) replaces a chosen one whole,
    # while recipes tune single keys of other groups on purpose for any option (bench_3b's
    # parallel.reshard_after_forward under parallel=ep, gpu_small's model.vocab_size)
    groups = {"curriculum"}
    all_groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir()}
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    explicit = [o.key_or_group for o in parsed if o.key_or_group not in all_groups]  # a.b.c=... the user's own
    experiment = OmegaConf.select(dcfg, "hydra.runtime.choices.experiment", default=None)
    out = []
    for o in parsed:
        value = o.value() if o.key_or_group in groups and not o.package and not o.is_delete() else None
        path = CONF_DIR / o.key_or_group / f"{value}.yaml" if isinstance(value, str) else None
        if path is None or not path.is_file():
            continue
        text = path.read_text()
        given = OmegaConf.to_container(OmegaConf.create(text), resolve=False) or {}
        given.pop("defaults", None)
        if "@package _global_" not in text.split("\n\n", 1)[0]:
            given = {o.key_or_group: given}
        lost = [k for k, v in _leaves(given) if not any(k == e or k.startswith(e + ".") or e.startswith(k + ".")
                                                          for e in explicit)
                and not _same(OmegaConf.select(dcfg, k, default=None, throw_on_resolution_failure=False), v)]
        if lost and _recipe_choice(experiment, o.key_or_group) == value:
            lost = []  # the recipe's own choice, which it tunes on purpose (long_context_2gpu + long_context)
        if lost:
            shown = ", ".join(lost[:4]) + (f" and {len(lost) - 4} more" if len(lost) > 4 else "")
            out.append(f"{o.key_or_group}={value} sets {shown}, but experiment={experiment} (composed after the "
                       f"groups) sets them differently, and its values are used")
    return out


def _recipe_choice(experiment: Optional[str], group: str) -> Optional[str]:
    """The option an experiment file picks for a group in its defaults list (`override /curriculum: x`)."""
    path = CONF_DIR / "experiment" / f"{experiment}.yaml"
    if not experiment or not path.is_file():
        return None
    from omegaconf import OmegaConf

    for entry in OmegaConf.to_container(OmegaConf.load(path)).get("defaults", []) or []:
        if isinstance(entry, dict):
            for k, v in entry.items():
                if k.replace("override", "").strip().lstrip("/") == group:
                    return v
    return None


def _leaves(tree, prefix: str = ""):
    """(dotted key, value) of a yaml tree's leaves; a list is one leaf (compared whole, see _same)."""
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            yield from _leaves(v, key + ".")
        elif "${" not in repr(v):  # an interpolation (also inside a list): resolved elsewhere, not compared
            yield key, v


def _same(have, given) -> bool:
    """Whether the composed value `have` is what the group file gave (dicts: the keys it gave; lists: item by
    item), so a schema's added defaults do not count as a change."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(have):
        have = OmegaConf.to_container(have, resolve=True)
    if isinstance(given, dict):
        return isinstance(have, dict) and all(_same(have.get(k), v) for k, v in given.items())
    if isinstance(given, list):
        return isinstance(have, list) and len(have) == len(given) and all(map(_same, have, given))
    if isinstance(have, str) != isinstance(given, str):  # the schema made a string of a yaml number (or back)
        return str(have) == str(given)
    return have == given


def check_elastic_readers(cfg, worlds: Sequence[int], dp: Sequence[int]) -> None:
    """An elastic range may restart the run with more data-parallel ranks than it started with; each needs one of
    the data readers, whose number is fixed when the run starts (data/readers.py). dp[i]: the data-parallel size
    on worlds[i] processes."""
    from data.readers import default_readers

    workers, readers = max(1, cfg.data.num_workers), cfg.data.readers
    fewest = readers or default_readers(min(dp), workers)  # data.readers=0: fixed by the size the run starts at
    if fewest < max(dp):
        got = (f"data.readers={readers}" if readers else f"data.readers=0 gives {fewest} (data-parallel ranks x "
               f"data.num_workers) when it starts with {min(worlds)} processes")
        raise ConfigError(f"the elastic range of {list(worlds)} processes may restart with {max(dp)} data-parallel "
                          f"ranks, each needing one of the data readers fixed when the run starts, but {got}; fix: "
                          f"data.readers={max(dp) * workers}")


def check_data(cfg) -> None:
    """Local inputs exist and are usable; the tokenizer fits the model. Reads at most a few files."""
    from data.sources import expand_path

    d, vocab = cfg.data, cfg.model.vocab_size
    for kind, sources in (("sources", d.sources), ("validation_sources", d.validation_sources)):
        for i, s in enumerate(sources):
            if s.name:
                _check_local_dataset(f"data.{kind}[{i}]", s)
            if not s.path:
                continue
            key = f"data.{kind}[{i}].path"
            files = expand_path(s.path)
            if not files:
                raise ConfigError(f"{key}={s.path!r} matches no file; give an existing file, directory or glob "
                                  "('**' is recursive, e.g. 'corpus/**/*.jsonl')")
            _check_documents(f"data.{kind}[{i}]", s, files)
    if d.tokenizer:
        path = os.path.expanduser(d.tokenizer)
        if not os.path.isfile(path):
            raise ConfigError(f"data.tokenizer={d.tokenizer!r}: no such file; train one with `python -m data.tokenizer "
                              f"train --input FILES --vocab-size N --output {d.tokenizer}` or set data.tokenizer=null "
                              "(the default tokenizer, trained on first use)")
        import sentencepiece as spm

        try:
            n = spm.SentencePieceProcessor(model_file=path).get_piece_size()
        except Exception as e:  # noqa: BLE001 - not a sentencepiece model
            raise ConfigError(f"data.tokenizer={d.tokenizer!r} is not a sentencepiece model ({one_line(e)[:120]}); "
                              "give a .model file written by `python -m data.tokenizer train`") from None
        if n > vocab:
            raise ConfigError(f"data.tokenizer={d.tokenizer!r} has {n} tokens but model.vocab_size={vocab}; set "
                              f"model.vocab_size={n} (or more) or use a smaller tokenizer")
    elif d.vocab_size > vocab:
        raise ConfigError(f"data.vocab_size={d.vocab_size} is more than model.vocab_size={vocab}; set "
                          f"model.vocab_size={d.vocab_size} (or more) or lower data.vocab_size")
    else:
        check_tokenizer_cache(d)


def check_tokenizer_cache(d) -> None:
    """The default tokenizer's cache can be a folder (it may be read-only when it holds the tokenizer already)."""
    from data.tokenizer import default_cache_dir

    if d.tokenizer_cache_dir:
        key, fix = "data.tokenizer_cache_dir", "give data.tokenizer_cache_dir a folder"
    elif os.environ.get("JAMBA_CACHE_DIR"):
        key, fix = "$JAMBA_CACHE_DIR", "set $JAMBA_CACHE_DIR to a folder"
    else:
        key, fix = "the tokenizer cache", "set $JAMBA_CACHE_DIR to a folder"
    check_dir_path(d.tokenizer_cache_dir or default_cache_dir(), key, fix)


def check_dir_path(path: str, key: str, fix: str, writable: bool = False) -> None:
    """path is a directory, or can be created (its nearest existing ancestor is a directory; with `writable`, one
    this process may write into). Otherwise train.py would fail after start-up with a traceback
    (FileExistsError, NotADirectoryError, PermissionError) on every rank. No `~` expansion: Hydra and the
    tokenizer cache take the path as given."""
    p = Path(str(path))
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{key}={path}: {p} exists and is not a directory; fix: {fix}")
    probe = p.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{key}={path}: {probe} is a file, so {p} cannot be created; fix: {fix}")
    if writable and not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={path}: {probe} is not writable (read-only or permissions); fix: {fix}")


def check_run_dir(dcfg, multirun: bool) -> None:
    """The run directory (Hydra's output dir) and its checkpoints folder can be created and written. A path that
    needs Hydra's runtime to resolve (${hydra:job.name}, ${hydra.job.num}) is left to Hydra."""
    from omegaconf import OmegaConf

    def select(key):
        try:
            return OmegaConf.select(dcfg, key, throw_on_resolution_failure=False)
        except Exception:  # noqa: BLE001 - a resolver that needs HydraConfig at run time
            return None

    if multirun:
        base, sub = select("hydra.sweep.dir"), select("hydra.sweep.subdir")
        run_dir, key = (os.path.join(str(base), str(sub)) if base and sub is not None else None), \
            "hydra.sweep.dir/subdir"
    else:
        run_dir, key = select("hydra.run.dir"), "hydra.run.dir"
    if not run_dir:
        return
    fix = "give hydra.run.dir a folder of its own (or leave it out: runs/<name>/<overrides>)"
    check_dir_path(str(run_dir), key, fix, writable=True)
    ckpts = Path(str(run_dir)) / "checkpoints"
    if ckpts.exists() and not ckpts.is_dir():
        raise ConfigError(f"{key}={run_dir}: {ckpts} exists and is not a directory (the run's checkpoints go there); "
                          f"fix: move it away, or {fix}")


def _check_local_dataset(key: str, source) -> None:
    """A `name:` source that is a local folder (not a hub id, which needs the network and is left to the run):
    `datasets` can stream its split, and its first record holds the text field. Otherwise every rank failed
    in its DataLoader with a traceback after the model was built."""
    name = source.name  # as the run's loader takes it (data/sources.py HubSource): no `~` expansion
    if not (name.startswith(("/", "./", "../", "~")) or os.path.exists(name)):
        return  # a hub id
    if not os.path.exists(name):
        tilde = " (`~` is not expanded: give the full path)" if name.startswith("~") else ""
        raise ConfigError(f"{key}.name={name!r}: no such local dataset folder{tilde}; give a folder of data files "
                          f"that `datasets.load_dataset` reads, or a hub id (org/name), or use path: for plain files")
    from itertools import islice

    try:
        from datasets import load_dataset

        records = list(islice(load_dataset(name, source.subset, split=source.split, streaming=True),
                              DOC_SCAN_LIMIT // 20))
    except Exception as e:  # noqa: BLE001 - datasets' errors: a bad split, no data files, a bad config
        raise ConfigError(f"{key}.name={name!r} (split={source.split!r}): `datasets` cannot stream it: "
                          f"{one_line(e)[:300]}") from None
    if not records:
        raise ConfigError(f"{key}.name={name!r} (split={source.split!r}) holds no records")
    if not any(isinstance(r.get(source.text_field), str) for r in records):  # the loader skips such records
        raise ConfigError(f"{key}.text_field={source.text_field!r}: none of the first {len(records)} records of "
                          f"{name!r} has a string field {source.text_field!r} (fields: {sorted(records[0])}); set "
                          f"text_field")


def _check_documents(key: str, source, files: Sequence[str]) -> None:
    """At least one usable document among the first DOC_SCAN_LIMIT raw documents of the source's files."""
    from data.sources import Skips, iter_file_documents

    stats = Skips(quiet=True)  # counts only: the pre-flight's verdict is the one line below
    seen = 0
    for path in files:
        for _, text in iter_file_documents(path, fmt=source.format, text_field=source.text_field,
                                           text_unit=source.text_unit, stats=stats):
            if text is not None:
                return
            seen += 1
            if seen >= DOC_SCAN_LIMIT:
                break
        if seen >= DOC_SCAN_LIMIT:
            break
    scanned = f"the first {seen} documents" if seen >= DOC_SCAN_LIMIT else f"all {len(files)} file(s)"
    hints = {"skipped_field": f"no string field {source.text_field!r}: set text_field",
             "skipped_json": "invalid JSON lines: check the format", "skipped_utf8": "not UTF-8 text",
             "skipped_empty": "empty documents", "skipped_file": "unreadable files: check the format"}
    why = "; ".join(f"{n} x {hints.get(k, k)}" for k, n in sorted(stats.items())) or "nothing to read"
    unreadable = [msg % args for reason, msg, args in stats.pending if reason == "skipped_file"]
    if unreadable:  # the reader's reason says what is wrong (e.g. a Parquet file without the text column)
        why += f"; the first: {unreadable[0][:200]}"
    raise ConfigError(f"{key}.path={source.path!r}: no usable document in {scanned} ({why}); "
                      f"fix the files or the source's format/text_field/text_unit")


# ---- command lines -------------------------------------------------------------------------------
def sweep_points(overrides: Sequence[str]) -> List[List[str]]:
    """The overrides of each point of a `-m` sweep (choice and range sweeps; at most MAX_SWEEP_POINTS)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    axes = []
    for text, o in zip(overrides, parsed):
        if o.is_sweep_override():
            prefix = text[:len(text) - len(text.lstrip("+~"))]
            axes.append([f"{prefix}{o.key_or_group}={v}" for v in o.sweep_string_iterator()])
        else:
            axes.append([text])
    return [list(p) for p in itertools.islice(itertools.product(*axes), MAX_SWEEP_POINTS)]


def _launcher_world(dcfg) -> Optional[int]:
    """Ranks per sweep point of a multi-node launcher (conf/hydra/launcher/slurm_gpu.yaml), if any."""
    try:
        launcher = dcfg.hydra.launcher
        if "nodes" in launcher and "tasks_per_node" in launcher:
            return int(launcher.nodes) * int(launcher.tasks_per_node)
    except Exception:  # noqa: BLE001 - a launcher without these keys: the caller's world size
        pass
    return None


def check_command(overrides: Sequence[str], world_size: Union[int, Sequence[int]] = 1, multirun: bool = False,
                  config_name: str = "config", data: bool = True, local_procs: Optional[int] = None,
                  run_dir: bool = True) -> List[int]:
    """Raise ConfigError (one-line message) if this train.py command line cannot run. world_size: the number of
    processes, or every number an elastic launch may start it with (each is checked). local_procs: the processes
    that will train on this machine, when it is the one that trains (train.py, the launchers; not a SLURM login
    node): then train.device=cuda needs that many visible GPUs here. run_dir: check the run directory too (with
    `data`; not for `--cfg`, which writes nothing). Returns the world sizes checked."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    overrides = list(overrides)
    try:
        OverridesParser.create().parse_overrides(overrides)
        points = sweep_points(overrides) if multirun else [overrides]
    except Exception as e:  # noqa: BLE001
        raise ConfigError(explain(e, overrides)) from None
    checked: List[int] = []
    said: set = set()
    for point in points:
        try:
            dcfg = compose(point, config_name)
            overridden = choices_note(point, dcfg)
            launcher = _launcher_world(dcfg) if multirun else None
            target = str(OmegaConf.select(dcfg, "hydra.launcher._target_", default="") or "") if multirun else ""
            slurm = "Slurm" in target.rsplit(".", 1)[-1]  # TorchSlurmLauncher, submitit's SlurmLauncher
            if slurm:
                missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
                if missing:  # else submitit fails after the sweep started, with a traceback
                    raise ConfigError(f"the sweep's launcher ({target}) submits every point as a SLURM job, but "
                                      f"{' and '.join(missing)} not found on PATH here: run the sweep on the "
                                      f"cluster's login node, or leave out hydra/launcher=... to run the points "
                                      f"here one after another")
            worlds = [launcher] if launcher else [int(w) for w in ([world_size] if isinstance(world_size, int)
                                                                   else world_size)]
            dp = []
            for i, world in enumerate(worlds):
                try:
                    cfg, dp_size = check_config(dcfg, world, data=data and i == 0)
                except ConfigError as e:
                    if len(worlds) == 1:
                        raise
                    raise ConfigError(f"with {world} processes (the elastic range allows {worlds}): {one_line(e)}"
                                      ) from None
                dp.append(dp_size)
            checked += [w for w in worlds if w not in checked]
            if len(worlds) > 1:
                check_elastic_readers(cfg, worlds, dp)
            if data and run_dir:
                check_run_dir(dcfg, multirun)
            if local_procs is not None:
                check_devices(cfg, local_procs)
            # about this machine's GPUs: only where the processes train (not a SLURM login node or sweep submitter)
            trains_here = local_procs is not None or (multirun and not slurm)
            note = cpu_on_gpu_machine(cfg, max(worlds), point) if trains_here else None
            for line in filter(None, (overridden, note)):
                if line not in said and _is_rank0() and not os.environ.get("JAMBA_PREFLIGHT_DONE"):
                    said.add(line)  # once per command (a sweep's points repeat it); else the launcher printed it
                    print(f"train.py: warning: {line}", file=sys.stderr, flush=True)
        except ConfigError as e:
            raise ConfigError(one_line(e)) from None
        except Exception as e:  # noqa: BLE001 - Hydra / OmegaConf / schema errors
            raise ConfigError(explain(e, point)) from None
    return checked


def visible_gpus() -> str:
    """How the GPUs were chosen, for messages: CUDA_VISIBLE_DEVICES when it is set."""
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f" (CUDA_VISIBLE_DEVICES={cvd!r})" if cvd is not None else ""


def check_devices(cfg, local_procs: int) -> None:
    """train.device=cuda (or auto, where CUDA works) on this machine: CUDA must work here and give each of its
    processes a GPU (torchrun binds local rank r to GPU r). Otherwise ranks fail after the launch, each with a
    traceback."""
    if cfg.train.device not in ("cuda", "auto"):
        return
    import torch

    if cfg.train.device == "auto" and not torch.cuda.is_available():
        return  # auto trains on CPU here
    if not torch.cuda.is_available():
        raise ConfigError(f"train.device=cuda but this machine has no usable CUDA GPU (torch {torch.__version__}, "
                          f"built for CUDA {torch.version.cuda or 'none'}){visible_gpus()}: run it on a GPU "
                          f"machine, or train on CPU with train.device=cpu and a CPU batch (e.g. experiment=debug)")
    gpus = torch.cuda.device_count()
    if local_procs > gpus:
        raise ConfigError(f"{local_procs} processes on this machine with train.device={cfg.train.device} (CUDA), but "
                          f"it has {gpus} GPU(s){visible_gpus()}: start at most {gpus} per machine "
                          f"(launch/single_node.sh -n {gpus})")


def cpu_on_gpu_machine(cfg, world: int, overrides: Sequence[str]) -> Optional[str]:
    """A warning when several processes would train on CPU on a machine with GPUs: the default recipe
    (experiment=cpu_demo) and experiment=debug set train.device=cpu, so `launch/single_node.sh -n 8 model=small`
    on a GPU node would run 8 CPU processes over gloo. None when that is not the case."""
    if world < 2 or cfg.train.device != "cpu":
        return None
    import torch

    gpus = torch.cuda.device_count()
    if gpus == 0:
        return None
    where = ("train.device=cpu on the command line" if _find_override(overrides, "train.device")
             else "train.device=cpu from the recipe (experiment=cpu_demo, the default, and experiment=debug set it)")
    return (f"{where}: these {world} processes train on CPU over gloo, although this machine has {gpus} GPU(s); "
            f"for the GPUs pass train.device=cuda with a GPU batch shape, or a GPU recipe such as "
            f"experiment=gpu_small")


def report(msg: str, prog: str = "train.py") -> None:
    print(f"{prog}: config error: {one_line(msg)}", file=sys.stderr, flush=True)


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def preflight_or_exit(argv: Sequence[str]) -> None:
    """train.py's guard: check its own command line (Hydra flags understood), exit 2 with one line if bad."""
    from hydra._internal.utils import get_args_parser

    try:
        args, _unknown = get_args_parser().parse_known_args(list(argv))
    except SystemExit:
        return  # Hydra reports its own flag errors
    if args.help or args.hydra_help or args.info or args.shell_completion or args.config_path or args.config_dir:
        return  # nothing to train, or a config tree other than conf/: Hydra's own checks apply
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # a sweep's points may run elsewhere (a SLURM launcher); a plain run trains here, LOCAL_WORLD_SIZE of them;
    # `--cfg job` only prints the config, so this machine's GPUs do not matter
    local = None if args.multirun or args.cfg else int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    try:
        check_command(args.overrides, world, multirun=bool(args.multirun), config_name=args.config_name or "config",
                      local_procs=local, run_dir=not args.cfg)
    except ConfigError as e:
        if not _is_rank0():
            # Let rank 0 print the one line: torchrun ends all workers when the first one exits, so a quiet rank
            # that exited first would kill rank 0 before it reports. Rank 0 (same config, same checks) exits
            # within seconds and torchrun then ends this wait (its SIGTERM: train.py's early handler, which would
            # keep this rank waiting, gives way to the default action); if it did not fail, say why this rank did.
            from trainer.signals import DEFAULT_SIGNALS, early_signal

            for name in DEFAULT_SIGNALS:
                signal.signal(getattr(signal, name), signal.SIG_DFL)
            caught = early_signal()
            if caught is not None:  # torchrun's SIGTERM came during the check: rank 0 has exited already
                os.kill(os.getpid(), getattr(signal, caught))  # its default action, as without the handler
            time.sleep(NONZERO_RANK_WAIT_S)
        report(str(e) if _is_rank0() else f"(rank {os.environ.get('RANK')}) {e}")
        sys.exit(EXIT_CONFIG_ERROR)


def _worlds(text: str) -> List[int]:
    worlds = [int(w) for w in text.split(",")]
    if not worlds or min(worlds) < 1:
        raise ValueError(text)
    return worlds


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    argv = list(sys.argv[1:] if argv is None else argv)
    train_args: List[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, train_args = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(prog="python -m trainer.preflight", description=__doc__.splitlines()[0])
    p.add_argument("--world-size", type=_worlds, default=[1],
                   help="processes of the run (nodes x processes per node); a comma-separated list for an elastic "
                        "node range (every one is checked)")
    p.add_argument("--multirun", "-m", action="store_true", help="the overrides are a sweep (train.py -m)")
    p.add_argument("--no-data", action="store_true", help="skip the data checks (inputs on another machine)")
    p.add_argument("--local-procs", type=int, default=None,
                   help="processes that will train on this machine (the launchers pass it): with train.device=cuda, "
                        "checks that this machine has that many GPUs")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    try:
        checked = check_command(args.overrides + train_args, args.world_size, args.multirun, data=not args.no_data,
                                local_procs=args.local_procs)
    except ConfigError as e:
        report(str(e))
        return EXIT_CONFIG_ERROR
    print(f"python -m trainer.preflight: the command can run on {', '.join(map(str, sorted(checked)))} process(es)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
