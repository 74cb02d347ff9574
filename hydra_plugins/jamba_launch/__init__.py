"""Hydra launcher plugin `TorchSlurmLauncher` (code and docs: launch/sweep.py; preset: conf/hydra/launcher/slurm_gpu.yaml).

Hydra instantiates launchers only from the `hydra_plugins` namespace package, so this shim lives here, in the
checkout (found through the repository root on sys.path, like `launch`, `trainer`; not installed).
"""

try:
    from launch.sweep import TorchSlurmLauncher as _TorchSlurmLauncher
except ImportError as _missing:  # hydra-submitit-launcher not installed: Hydra would warn on every run
    from hydra.plugins.launcher import Launcher as _Launcher

    _REASON = str(_missing)

    class TorchSlurmLauncher(_Launcher):  # type: ignore[no-redef]
        """Stand-in that explains how to get the SLURM sweep launcher."""

        def __init__(self, **_kwargs) -> None:
            pass

        def setup(self, **_kwargs) -> None:
            raise ImportError(f"hydra/launcher=slurm_gpu needs hydra-submitit-launcher ({_REASON}); "
                              "install it with `pip install hydra-submitit-launcher`")

        def launch(self, job_overrides, initial_job_idx):  # pragma: no cover - setup raises first
            raise NotImplementedError
else:
    class TorchSlurmLauncher(_TorchSlurmLauncher):  # type: ignore[no-redef]
        """Hydra's submitit SLURM launcher, one rank per SLURM task, checkpoint-then-requeue on preemption."""


__all__ = ["TorchSlurmLauncher"]
