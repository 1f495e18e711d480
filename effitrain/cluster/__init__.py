"""Running on a cluster: SLURM's environment, the submitit launcher presets, sweep manifests (docs/cluster.md)."""
