"""Replacing one marked section of a markdown file (the benchmark scripts' ``--write``)."""

from __future__ import annotations

from pathlib import Path


def replace_marked_section(path: Path, start: str, end: str, section: str) -> None:
    """``section`` (which begins with ``start`` and ends with ``end``) replaces the marked section of ``path``, or is
    appended when the file has none yet."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + section.rstrip("\n") + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    path.write_text(text)


def with_reading(body: str, script: str) -> str:
    """``body``, then the script's reading after a blank line: ``docs/readings/<the script's stem>.md``, prose
    tracked in git that a rerun of the script keeps (no such file: ``body`` alone)."""
    reading = Path(script).resolve().parents[1] / "docs" / "readings" / f"{Path(script).stem}.md"
    return body + ("\n" + reading.read_text().rstrip() + "\n" if reading.exists() else "")


def load_average() -> str:
    """The one-minute load average as ``/proc/loadavg`` gives it ("?" where there is none)."""
    import os

    return open("/proc/loadavg").read().split()[0] if os.path.exists("/proc/loadavg") else "?"
