"""What SLURM tells a task about its job, read from the environment (torch-free, no subprocess).

SLURM describes the hosts of a job in a compressed form (``node[01-03,07],gpu-a[1-2]``); the first host is where
rank 0 runs, so it is the rendezvous address of ``torch.distributed``.  The port is derived from the job id, so
every task of a job computes the same one without talking to the others, and two jobs sharing a node differ.
"""

from __future__ import annotations

import itertools
import os
import re
from typing import Mapping, Optional

# Below Linux's ephemeral range (32768-60999), so an outgoing connection's port never collides with it.
PORT_BASE = 20000
PORT_SPAN = 10000


def expand_nodelist(nodelist: str) -> list[str]:
    """``"a[1-2],b07,c[08-09]-x"`` -> ``["a1", "a2", "b07", "c08-x", "c09-x"]``; zero padding is kept, and a host
    name may hold several bracket groups (``r[1-2]-n[1-2]``: their product)."""
    hosts: list[str] = []
    for group in _split_top_level(nodelist.strip()):
        parts = re.split(r"(\[[^\]]*\])", group)
        choices = [_expand_brackets(p) if p.startswith("[") else [p] for p in parts if p]
        hosts.extend("".join(combo) for combo in itertools.product(*choices))
    return hosts


def _split_top_level(text: str) -> list[str]:
    """Split at the commas that are not inside brackets."""
    groups, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            groups.append(text[start:i])
            start = i + 1
    groups.append(text[start:])
    return [g for g in groups if g]


def _expand_brackets(bracket: str) -> list[str]:
    out = []
    for item in bracket[1:-1].split(","):
        lo, sep, hi = item.partition("-")
        if not sep:
            out.append(lo)
            continue
        width = len(lo)  # "01-10": the padding of the lower bound is SLURM's
        out.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
    return out


def master_port(job_id: str) -> int:
    """The rendezvous port of a job: the same on every task, different for jobs whose ids differ by < PORT_SPAN."""
    return PORT_BASE + int(job_id) % PORT_SPAN


def job_id(env: Mapping[str, str]) -> Optional[str]:
    """The job's id; for an array task the array job's own id (each array task is a job of its own in SLURM)."""
    return env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")


def slurm_world(env: Mapping[str, str]) -> Optional[dict[str, str]]:
    """torch.distributed's variables for a task started by SLURM (``srun``, or submitit's ``tasks_per_node``), or
    None where SLURM did not start several tasks (a plain job, or a single task that runs torchrun itself).

    The tasks are those of the job *step* (``SLURM_STEP_NUM_TASKS``, set by srun only), not of the allocation: a
    batch script and an ``salloc`` shell run once although the job has ``SLURM_NTASKS=2`` (the batch script even
    has ``SLURM_PROCID=0``), and read as a world of two they waited forever for a second rank that never comes."""
    ntasks = env.get("SLURM_STEP_NUM_TASKS", "")
    if "SLURM_PROCID" not in env or not ntasks.isdigit() or int(ntasks) <= 1:
        return None
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    jid = job_id(env)
    if not nodelist or not jid:
        return None
    return {"RANK": env["SLURM_PROCID"], "LOCAL_RANK": env.get("SLURM_LOCALID", "0"), "WORLD_SIZE": ntasks,
            "MASTER_ADDR": expand_nodelist(nodelist)[0], "MASTER_PORT": str(master_port(jid))}


def tasks_not_started(env: Mapping[str, str]) -> int:
    """The job's task count where effitrain runs outside any job step (a batch script or an ``salloc`` shell that did
    not go through ``srun``) of a job that asked for several tasks; 0 otherwise."""
    ntasks = env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS") or ""
    if job_id(env) is None or "SLURM_STEP_NUM_TASKS" in env or not ntasks.isdigit():
        return 0
    return int(ntasks) if int(ntasks) > 1 else 0


def restart_count(env: Optional[Mapping[str, str]] = None) -> int:
    """How many times SLURM has requeued this job (``SLURM_RESTART_COUNT``, set by SLURM on a requeued job only)."""
    env = os.environ if env is None else env  # read at call time: os.environ may have been replaced since import
    value = env.get("SLURM_RESTART_COUNT", "0").strip()
    return int(value) if value.isdigit() else 0


def is_requeued(env: Optional[Mapping[str, str]] = None) -> bool:
    """True in a job that SLURM started again after a requeue (preemption, ``scontrol requeue``, submitit's
    checkpoint-and-requeue): its run directory holds the run to continue.  Never guessed from the directory."""
    env = os.environ if env is None else env
    return job_id(env) is not None and restart_count(env) > 0
