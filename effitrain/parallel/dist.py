"""The distributed environment: one process, torchrun, or a cluster launcher, all through torch.distributed."""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int


def launch_variables(environ: Mapping[str, str]) -> tuple[dict[str, str], str]:
    """The torch.distributed variables this process will use, and who set them: ``torchrun``, ``SLURM`` (srun's
    tasks) or ``the environment`` (a launcher of the user's own -- or values left in the shell).  Reads only.

    A job inherits the submitting shell's environment (``sbatch --export=ALL``), so RANK/WORLD_SIZE/MASTER_* found
    in a several-task job step are only trusted when torchrun set them (``TORCHELASTIC_RUN_ID``); otherwise they are
    stale (left in the submitting shell or process) and SLURM's values replace them: a stale WORLD_SIZE=1 made every
    task of a 2-task job train alone, and a stale MASTER_PORT sent every job of a node to one port."""
    from effitrain.cluster.slurm_env import slurm_world

    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    if "TORCHELASTIC_RUN_ID" in environ:
        return {k: environ[k] for k in keys if k in environ}, "torchrun"
    slurm = slurm_world(environ)
    if slurm:
        return slurm, "SLURM"
    return {k: environ[k] for k in keys if k in environ}, "the environment"


def check_launch_environment(environ: Mapping[str, str]) -> None:
    """Refuse a launch whose distributed variables cannot describe a world: a one-process launch must never wait
    silently for ranks that will not come.  RANK/WORLD_SIZE left in the shell by an earlier torchrun or an
    exported script are the usual cause, so the message names the variable and both ways out."""
    from effitrain.cluster.slurm_env import tasks_not_started
    from effitrain.registry import ConfigError

    values, origin = launch_variables(environ)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        text = values.get(key, "").strip()
        if key in values and not (text.isdigit() and (key != "WORLD_SIZE" or int(text) >= 1)):
            raise ConfigError(f"{key}={values[key]!r} in the environment: expected a "
                              f"{'positive' if key == 'WORLD_SIZE' else 'non-negative'} whole number (set by "
                              f"torchrun or SLURM); unset it for a one-process run")
    world, rank = int(values.get("WORLD_SIZE", "1")), int(values.get("RANK", "0"))
    one_process = ("for one process unset RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; for several, "
                   "launch with 'torchrun --nproc_per_node N -m effitrain.cli ...' or 'srun'")
    if rank >= world:
        raise ConfigError(f"RANK={rank} is set in {origin} but WORLD_SIZE is {world}, so this process has no place "
                          f"in the world (left from another launch?); {one_process}")
    if world > 1:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not values.get(k, "").strip()]
        if missing:
            raise ConfigError(f"WORLD_SIZE={world} is set in {origin} but {' and '.join(missing)} "
                              f"{'is' if len(missing) == 1 else 'are'} not, so the {world} processes have nowhere "
                              f"to meet (left from another launch?); {one_process}")
    if world == 1 and tasks_not_started(environ):
        from effitrain.console import say

        say(f"note: this SLURM job has {tasks_not_started(environ)} tasks, but effitrain was started once (not by "
            f"srun), so it trains as one process; run 'srun effitrain ...' for one process per task", err=True)


def dist_env() -> DistEnv:
    """Read torchrun's (or SLURM's) variables; a plain `effitrain` is a world of one.

    Under SLURM with several tasks (``srun -n 2``, ``tasks_per_node=2``) rank, world size, local rank and the
    rendezvous address/port come from SLURM's environment (effitrain.cluster.slurm_env), so no manual exports are
    needed; torchrun's own variables win where torchrun runs inside one task (see :func:`launch_variables`)."""
    values, origin = launch_variables(os.environ)
    if origin == "SLURM":
        os.environ.update(values)
    os.environ[_ORIGIN] = origin
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    return DistEnv(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))


_ORIGIN = "EFFITRAIN_LAUNCHED_BY"  # who set this process's world (launch_variables); read by the rendezvous note
RENDEZVOUS_NOTE_AFTER_S = 10.0  # a wait longer than this is said on the terminal (rendezvous, extension lock)


def init_process_group(device_type: str) -> None:
    """Initialise torch.distributed, then DeepSpeed's communication layer on top of it.

    A world of one uses a FileStore rather than a TCP port, whatever MASTER_PORT says: a port picked as "free" can be
    taken by another process before the store binds it, which made single-process runs fail at random on a busy
    machine, and a MASTER_PORT inherited from the shell made every single-task job of a SLURM node use one port.
    """
    import deepspeed
    import torch.distributed as dist

    backend = "nccl" if device_type == "cuda" else "gloo"
    say_when_waiting_on_extension_locks()
    if not dist.is_initialized():
        if int(os.environ["WORLD_SIZE"]) == 1:
            store = dist.FileStore(os.path.join(tempfile.mkdtemp(prefix="effitrain-store-"), "store"), 1)
            dist.init_process_group(backend, store=store, rank=0, world_size=1)
        else:
            with _said_while_waiting():
                dist.init_process_group(backend)  # env:// from torchrun / SLURM (MASTER_ADDR, MASTER_PORT)
    if dist.get_world_size() == 1:
        with _no_shared_memory_op():
            deepspeed.init_distributed(dist_backend=backend, verbose=False)
    else:
        deepspeed.init_distributed(dist_backend=backend, verbose=False)


def say_when_waiting_on_extension_locks() -> None:
    """torch compiles an extension (DeepSpeed's CPU Adam for offload, its shared-memory op for several CPU processes)
    under a lock file in the extensions folder, and waits without a word while another process holds it -- forever
    when a killed compile left it behind.  Make that wait say which file it waits on and what to do about it."""
    from torch.utils import file_baton

    if getattr(file_baton.FileBaton.wait, "_effitrain", False):
        return
    original = file_baton.FileBaton.wait

    def wait(self) -> None:
        from effitrain.console import say

        timer = _timer(lambda: say(
            f"waiting for the lock {self.lock_file_path}: another process is compiling this torch extension, or a "
            f"compile that was killed left the lock behind (then delete that file)", err=True))
        try:
            original(self)
        finally:
            timer.cancel()

    wait._effitrain = True  # type: ignore[attr-defined]
    file_baton.FileBaton.wait = wait


def _timer(action) -> "threading.Timer":
    import threading

    timer = threading.Timer(RENDEZVOUS_NOTE_AFTER_S, action)
    timer.daemon = True
    timer.start()
    return timer


@contextlib.contextmanager
def _said_while_waiting():
    """The rendezvous of several processes blocks until all of them have joined; a terminal that stays blank while
    it waits reads as a hang.  After a few seconds, say what it waits for and who asked for that world."""
    from effitrain.console import say

    world, rank = os.environ["WORLD_SIZE"], os.environ["RANK"]
    where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    origin = os.environ.get(_ORIGIN, "the environment")
    hint = ("" if origin in ("torchrun", "SLURM") else
            "; if this is meant to be one process, stop it (Ctrl-C) and unset RANK, LOCAL_RANK, WORLD_SIZE, "
            "MASTER_ADDR and MASTER_PORT")
    timer = _timer(lambda: say(f"rank {rank}: waiting for all {world} processes of this run to join at {where} "
                               f"(WORLD_SIZE={world}, RANK={rank} from {origin}){hint}", err=True))
    try:
        yield
    finally:
        timer.cancel()


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
