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
