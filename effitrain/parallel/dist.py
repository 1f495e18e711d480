"""The distributed environment: one process, torchrun, or a cluster launcher, all through torch.distributed."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int


def dist_env() -> DistEnv:
    """Read torchrun's (or SLURM's) variables; a plain `effitrain` is a world of one."""
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    return DistEnv(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))


def init_process_group(device_type: str) -> None:
    """Initialise torch.distributed, then DeepSpeed's communication layer on top of it.

    A world of one uses a FileStore rather than a TCP port: a port picked as "free" can be taken by another process
    before the store binds it, which made single-process runs fail at random on a busy machine.
    """
    import deepspeed
    import torch.distributed as dist

    backend = "nccl" if device_type == "cuda" else "gloo"
    if not dist.is_initialized():
        if int(os.environ["WORLD_SIZE"]) == 1 and "MASTER_PORT" not in os.environ:
            store = dist.FileStore(os.path.join(tempfile.mkdtemp(prefix="effitrain-store-"), "store"), 1)
            dist.init_process_group(backend, store=store, rank=0, world_size=1)
        else:
            dist.init_process_group(backend)  # env:// from torchrun / SLURM (MASTER_ADDR, MASTER_PORT)
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
