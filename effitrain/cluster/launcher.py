"""The launcher behind ``hydra/launcher=slurm``: Hydra's submitit SLURM launcher, with one job per sweep member
named ``NAME:RECIPE:MEMBER``, a sweep manifest at the sweep root, and every member's outcome reported to the head
(an exit status, never an exception that stops the head or a result it waits for forever).

The jobs themselves run the plugin's own ``__call__`` and ``checkpoint`` (submitit's checkpointing protocol), so
a requeued member is the same callable with the same arguments (effitrain.cluster.job)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as _SubmititSlurmLauncher
from omegaconf import OmegaConf

from effitrain.cluster.manifest import member_entry, write_manifest
from effitrain.errors import EXIT_FAILED, JOB_EXITS

log = logging.getLogger(__name__)
_EXECUTOR_INIT_KEYS = {"submitit_folder", "max_num_timeout"}


def job_name(prefix: str, overrides: Sequence[str], member: int) -> str:
    """``effitrain:galore:3``; the recipes of a member joined by '+', 'default' without one."""
    recipes = "default"
    for o in overrides:
        key, _, value = o.partition("=")
        if key.lstrip("+") == "recipe":
            recipes = value.strip("[]'\" ").replace(",", "+").replace(" ", "") or "default"
    return f"{prefix}:{recipes}:{member}"


class SlurmLauncher(_SubmititSlurmLauncher):
    def _executor(self):
        import submitit

        params = dict(self.params)
        executor = submitit.AutoExecutor(folder=params["submitit_folder"], cluster="slurm",
                                         slurm_max_num_timeout=params["max_num_timeout"])
        shared = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in shared else f"slurm_{k}": v for k, v in params.items()
                                      if k not in _EXECUTOR_INIT_KEYS})
        return executor

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None
        executor = self._executor()
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info(f"SLURM sweep: {len(job_overrides)} members in {sweep_dir}")

        members = []
        for offset, overrides in enumerate(job_overrides):
            member = initial_job_idx + offset
            overrides = list(overrides)
            shown = [o for o in overrides if not o.startswith("run_dir=")]  # the sweep's root, not the member's
            executor.update_parameters(name=job_name(self.params.get("name") or "effitrain", overrides, member))
            job = executor.submit(self, overrides, "hydra.sweep.dir", member, f"job_id_for_{member}",
                                  Singleton.get_state())
            log.info(f"\t#{member} : {' '.join(filter_overrides(overrides))} (job {job.job_id})")
            members.append((member, shown, job))
        entries = {m: member_entry(m, sweep_dir / str(m), o, job_id=j.job_id) for m, o, j in members}
        write_manifest(sweep_dir, list(entries.values()))

        returns = []
        for member, overrides, job in members:
            code, message, ret = _outcome(job)
            entries[member] = member_entry(member, sweep_dir / str(member), overrides, code=code,
                                           job_id=job.job_id, message=message)
            write_manifest(sweep_dir, list(entries.values()))
            JOB_EXITS.append(code)  # the CLI's exit status for the sweep (effitrain.cli._run_hydra)
            if message:
                print(f"effitrain: error: sweep member {member} ({' '.join(overrides)}): {message}", file=sys.stderr)
            ret.status, ret.return_value = JobStatus.COMPLETED, code  # the head reads the status, not an exception
            returns.append(ret)
        return returns


def _outcome(job: Any) -> tuple[int, str, JobReturn]:
    """(exit status, message for a member that did not finish, Hydra's JobReturn) of a submitted member."""
    from effitrain.cluster.job import JobFailed

    try:
        ret = job.results()[0]  # rank 0's; waits for the job (requeues included) to end
    except Exception as exc:  # noqa: BLE001 - the job died without a result (killed, cancelled, node failure)
        text = str(exc).strip().splitlines()
        return EXIT_FAILED, f"job {job.job_id} ended without a result ({type(exc).__name__}: " \
                            f"{text[-1] if text else ''})", JobReturn()
    if ret.status == JobStatus.COMPLETED:
        code = ret._return_value if isinstance(ret._return_value, int) else 0
        return code, "", ret
    error = ret._return_value
    if isinstance(error, JobFailed):
        return error.code, error.message, ret
    return EXIT_FAILED, f"{type(error).__name__}: {error}", ret
