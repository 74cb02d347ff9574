"""Hydra launcher plugin `TorchSlurmLauncher` (code and docs: launch/sweep.py; preset: conf/hydra/launcher/slurm_gpu.yaml).

Hydra instantiates launchers only from the `hydra_plugins` namespace package, so this shim lives here, in the
checkout (found through the repository root on sys.path, like `launch`, `trainer`; not installed).
"""

from launch.sweep import TorchSlurmLauncher as _TorchSlurmLauncher


class TorchSlurmLauncher(_TorchSlurmLauncher):
    """Hydra's submitit SLURM launcher, one rank per SLURM task, checkpoint-then-requeue on preemption."""


__all__ = ["TorchSlurmLauncher"]
