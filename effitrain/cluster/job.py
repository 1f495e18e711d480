"""A training job inside a submitit (SLURM) job: requeue detection, the hand-over of a signal stop to submitit's
checkpoint-and-requeue protocol, and a failure that submitit records as one.

One requeue path: submitit's.  SLURM (``--signal=USR2@signal_delay_s``) or an operator (``scancel -s USR2``)
sends SIGUSR2; the training loop saves a checkpoint at the end of the step and returns; then submitit's own
handler runs: it calls the launcher's ``checkpoint()`` (a DelayedSubmission of the same member), ``scontrol
requeue``s the job (a time limit counts against ``max_num_timeout``, a preemption does not) and exits without a
result, so the sweep's head keeps waiting.  SIGTERM means SLURM itself is already preempting/requeueing the job
(``scontrol requeue``, PreemptMode=REQUEUE) or cancelling it: the loop saves and the job exits without a result;
it never asks for a second requeue.  The requeued job sees ``SLURM_RESTART_COUNT`` > 0 and continues its run
directory from the newest complete checkpoint.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any, Callable, Optional

from effitrain.cluster.slurm_env import is_requeued

RequeueHandler = Callable[[int, Any], None]


class JobFailed(Exception):
    """A sweep member that did not finish (refused, failed, diverged, out of requeues): raised in the job so that
    Hydra and submitit record a failure that reaches the sweep's head, with the exit status it would have had."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __reduce__(self):  # travels back to the head in submitit's result pickle
        return (JobFailed, (self.code, self.message))


def submitit_requeue_handler() -> Optional[RequeueHandler]:
    """submitit's SIGUSR2 handler (its checkpoint-and-requeue) when this process is a submitit job, else None.
    Read before the training loop installs its own handler for the same signal."""
    handler = signal.getsignal(signal.SIGUSR2)
    owner = getattr(handler, "__self__", None)
    if owner is not None and type(owner).__module__.startswith("submitit.") and callable(handler):
        return handler  # type: ignore[return-value]
    return None


def resume_after_requeue(run_dir: Path, resume: Optional[str]) -> Optional[str]:
    """``resume`` for a job: ``auto`` when SLURM restarted this job and its run directory holds the run."""
    from effitrain.engine.rundir import holds_run

    if resume is None and is_requeued() and run_dir.is_dir() and holds_run(run_dir):
        return "auto"
    return resume


def hand_over_stop(summary: dict[str, Any], handler: Optional[RequeueHandler]) -> None:
    """After the loop saved a checkpoint on a signal, inside a submitit job: let submitit requeue (SIGUSR2, rank
    0), or exit without a result (SIGTERM: SLURM requeues or cancels the job itself; other ranks: rank 0's
    requeue ends the whole job).  Never returns."""
    if summary.get("stopped_by_signal") == "SIGUSR2" and os.environ.get("RANK", "0") == "0" and handler is not None:
        try:
            handler(signal.SIGUSR2, None)  # checkpoint() -> DelayedSubmission, scontrol requeue, sys.exit(-1)
        except Exception as exc:  # noqa: BLE001 - e.g. "timed-out too many times" (max_num_timeout reached)
            from effitrain.errors import EXIT_RESUMABLE
            raise JobFailed(EXIT_RESUMABLE, f"checkpoint saved but the job was not requeued: {exc}") from None
    raise SystemExit(-1)  # submitit's own "exited after preemption/timeout": no result file, the head waits
