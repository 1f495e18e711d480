"""Hydra finds launchers only inside the ``hydra_plugins`` namespace package: this is where effitrain's SLURM
launcher (effitrain.cluster.launcher) is made visible to it.  Imported by Hydra at every start: keep it light
(no torch), and empty where the submitit plugin is not installed."""

try:
    from effitrain.cluster import launcher as _impl
except ImportError:  # pip install 'effitrain[cluster]' brings hydra-submitit-launcher
    _impl = None

if _impl is not None:
    class SlurmLauncher(_impl.SlurmLauncher):
        """``hydra/launcher=slurm`` and ``slurm_gpu`` (effitrain/configs/hydra/launcher)."""
