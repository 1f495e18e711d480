r"""What a run's exit status means, and the one error class besides ConfigError that the CLI prints as one line.

| status | meaning |
|---|---|
| 0   | finished (or a tool verb succeeded) |
| 1   | failed: an internal error (with its traceback) or a failure of the machine, such as a full disk |
| 2   | refused: bad input (config, data, files, run directory) — nothing was started or changed |
| 3   | stopped by the non-finite guard (the loss or gradients diverged); the reason is in summary.json |
| 75  | stopped by a signal (SIGTERM, SIGUSR1, Ctrl-C) after saving a checkpoint: continue with resume=auto |
| 130 | interrupted by a second Ctrl-C without saving |
| 141 | a tool verb's reader closed the pipe early (`effitrain recipes \| head`), as a shell reports SIGPIPE |

75 is ``EX_TEMPFAIL`` of sysexits.h: "try again later", which is what a stopped, resumable run asks for.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_DIVERGED = 3
EXIT_RESUMABLE = 75
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141

# The exit statuses of the jobs of this invocation (one for a run, one per member of a sweep), appended by whoever
# learns them: the CLI for jobs in this process, the SLURM launcher (effitrain.cluster.launcher) for remote ones.
JOB_EXITS: list[int] = []

# Where a genuine internal error (a bug: it keeps its traceback) should be reported.
REPORT_BUGS = ("this is a bug in effitrain, not in your input: please report it to the effitrain issue tracker "
               "with the traceback above, the command line and the run directory's third_party.log")


class RunFailed(Exception):
    """A run that cannot go on for a reason outside the code (a full disk): one line, exit status 1."""
