"""The distributed environment: one process, torchrun, or a cluster launcher, all through torch.distributed."""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int


def dist_env() -> DistEnv:
    """Read torchrun's (or SLURM's) variables; a plain `effitrain` is a world of one.

    Under SLURM with several tasks (``srun -n 2``, ``tasks_per_node=2``) rank, world size, local rank and the
    rendezvous address/port come from SLURM's environment (effitrain.cluster.slurm_env), so no manual exports are
    needed; torchrun's own variables win where torchrun runs inside one task.

    A job inherits the submitting shell's environment (``sbatch --export=ALL``), so RANK/WORLD_SIZE/MASTER_* found
    in a several-task job step are only trusted when torchrun set them (``TORCHELASTIC_RUN_ID``); otherwise they are
    stale (left in the submitting shell or process) and SLURM's values replace them: a stale WORLD_SIZE=1 made every
    task of a 2-task job train alone, and a stale MASTER_PORT sent every job of a node to one port."""
    from effitrain.cluster.slurm_env import slurm_world

    if "TORCHELASTIC_RUN_ID" not in os.environ:
        os.environ.update(slurm_world(os.environ) or {})
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    return DistEnv(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))


def init_process_group(device_type: str) -> None:
    """Initialise torch.distributed, then DeepSpeed's communication layer on top of it.

    A world of one uses a FileStore rather than a TCP port, whatever MASTER_PORT says: a port picked as "free" can be
    taken by another process before the store binds it, which made single-process runs fail at random on a busy
    machine, and a MASTER_PORT inherited from the shell made every single-task job of a SLURM node use one port.
    """
    import deepspeed
    import torch.distributed as dist

    backend = "nccl" if device_type == "cuda" else "gloo"
    if not dist.is_initialized():
        if int(os.environ["WORLD_SIZE"]) == 1:
            store = dist.FileStore(os.path.join(tempfile.mkdtemp(prefix="effitrain-store-"), "store"), 1)
            dist.init_process_group(backend, store=store, rank=0, world_size=1)
        else:
            dist.init_process_group(backend)  # env:// from torchrun / SLURM (MASTER_ADDR, MASTER_PORT)
    if dist.get_world_size() == 1:
        with _no_shared_memory_op():
            deepspeed.init_distributed(dist_backend=backend, verbose=False)
    else:
        deepspeed.init_distributed(dist_backend=backend, verbose=False)


@contextlib.contextmanager
def _no_shared_memory_op():
    """DeepSpeed's CPU communication layer compiles a shared-memory all-reduce op with gcc when it starts (about
    80 s the first time, again whenever another environment touched the torch extensions folder, and a silent wait
    forever on a lock left by a killed compile).  A world of one never communicates, so it is not built there:
    DeepSpeed's own fallback when the op is unavailable (``build_shm_op`` returning None) is torch.distributed."""
    import importlib

    try:  # by module path: the attribute deepspeed.comm.torch is the torch package, which deepspeed.comm imports
        ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    except ImportError:  # a DeepSpeed without the hook: nothing to avoid
        yield
        return
    original = getattr(ds_torch_comm, "build_shm_op", None)
    if original is None:
        yield
        return
    ds_torch_comm.build_shm_op = lambda: None
    try:
        yield
    finally:
        ds_torch_comm.build_shm_op = original
