"""The run's console: effitrain's own lines on the terminal, everything else in the run directory's log.

Third-party libraries print at every level: DeepSpeed's op probe runs a C compiler whose command lines land on the
process's stdout, bitsandbytes and transformers emit warnings, Python prints FutureWarnings.  None of that is the
run's output, but all of it matters when something breaks.  :func:`quiet` therefore redirects the process's file
descriptors 1 and 2 (which catches C-level writes too) into a log file, and effitrain writes its own lines through
:func:`say` / :func:`terminal` to duplicates of the original descriptors.  The log starts in a temporary file and
moves into the run directory (``third_party.log``) once that exists.  ``effitrain --verbose`` (or
``EFFITRAIN_VERBOSE=1``) turns the redirection off.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator, Optional, TextIO

LOG_NAME = "third_party.log"
VERBOSE_ENV = "EFFITRAIN_VERBOSE"

_terminal_out: Optional[TextIO] = None
_terminal_err: Optional[TextIO] = None
_log_path: Optional[Path] = None


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false")


def terminal(err: bool = False) -> TextIO:
    """The stream that reaches the user's terminal, whether or not third-party output is being captured."""
    if err:
        return _terminal_err or sys.stderr
    return _terminal_out or sys.stdout


def say(text: str, err: bool = False) -> None:
    """One of effitrain's own lines."""
    stream = terminal(err)
    stream.write(text + "\n")
    stream.flush()


def say_from_signal_handler(text: str, err: bool = False) -> None:
    """One of effitrain's own lines, written from a signal handler: one ``os.write`` to the terminal's descriptor.

    A handler runs between two bytecodes of whatever the process was doing, possibly inside a write to the same
    buffered stream; writing through the stream again there raises "reentrant call inside BufferedWriter" (a
    second Ctrl-C that arrived while the first one's line was being written did exactly that)."""
    stream = terminal(err)
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # a stream without a descriptor (a test's StringIO)
        stream.write(text + "\n")
        return
    os.write(fd, (text + "\n").encode())


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Capture file descriptors 1 and 2 for the duration; effitrain's own lines still reach the terminal."""
    global _terminal_out, _terminal_err, _log_path
    if _terminal_out is not None:  # already capturing (a run inside a run)
        yield
        return
    if verbose():
        with _own_log_lines(sys.stdout):
            yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    handle, name = tempfile.mkstemp(prefix="effitrain-", suffix=".log")
    _log_path = Path(name)
    _terminal_out = os.fdopen(os.dup(saved[0]), "w", buffering=1)
    _terminal_err = os.fdopen(os.dup(saved[1]), "w", buffering=1)
    os.dup2(handle, 1)
    os.dup2(handle, 2)
    os.close(handle)
    failed = False
    try:
        with _own_log_lines(_terminal_out):
            yield
    except BaseException as exc:
        from effitrain.errors import RunFailed
        from effitrain.registry import ConfigError

        failed = not isinstance(exc, (ConfigError, RunFailed))  # a refusal or a full disk says all in one line
        raise
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        for stream in (_terminal_out, _terminal_err):
            stream.close()
        _terminal_out = _terminal_err = None
        unattached = _log_path is not None and _log_path.parent == Path(tempfile.gettempdir())
        if unattached and (not failed or _log_path.stat().st_size == 0):
            _log_path.unlink(missing_ok=True)  # nothing went wrong before a run directory existed
        elif unattached:
            print(f"effitrain: third-party output of this launch: {_log_path}", file=sys.stderr)
        _log_path = None


@contextlib.contextmanager
def _own_log_lines(stream: TextIO) -> Iterator[None]:
    """effitrain's own log records (e.g. "training a proxy model ...") are its lines too: to the terminal."""
    own = logging.getLogger("effitrain")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    saved = own.level, own.propagate
    own.addHandler(handler)
    own.setLevel(logging.INFO)
    own.propagate = False
    try:
        yield
    finally:
        own.removeHandler(handler)
        own.setLevel(saved[0])
        own.propagate = saved[1]


def attach_log(run_dir: Path, rank: int = 0) -> None:
    """Move the captured output into ``run_dir/third_party.log`` (``third_party.rank{r}.log`` for the other ranks)
    and keep appending there."""
    global _log_path
    if _log_path is None or _log_path.parent == run_dir:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    target = run_dir / (LOG_NAME if rank == 0 else LOG_NAME.replace(".log", f".rank{rank}.log"))
    with open(target, "ab") as out, open(_log_path, "rb") as old:
        shutil.copyfileobj(old, out)
    fd = os.open(target, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    _log_path.unlink(missing_ok=True)
    _log_path = target
