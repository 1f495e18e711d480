"""Selection manifests: the chosen ids with their scores and the parameters, cached under a hash of the inputs.

Layout (``<selection cache>/<method>-<key[:16]>/``, the cache being ``$EFFITRAIN_CACHE/selection`` by default)::

    manifest.json   {"key", "method", "params", "seed", "inputs": {"pool", "target"}, "counts", "info", "created"}
    selected.jsonl  one line per kept example: {"index", "id", "score"[, "cluster"]}  (index = position among the
                    candidates, i.e. the train split after the target hold-out)

The key hashes the *content* of the pool's train split (ids and texts), of the target texts, the method, every
scorer/selector/budget parameter, the seed and :data:`VERSION`; any change gives a new key (a new manifest), the same
inputs find the old one.

Trust, in order:

* ``manifest.json`` stores the SHA-256 of ``selected.jsonl``; :func:`load` recomputes it, checks that every index
  lies among the candidates and that the count matches, and on any mismatch (an edited file, even with the same line
  count; a truncated one; an index out of range) logs a warning and answers ``None``, so the caller scores again and
  rewrites the manifest.
* Writers of one key are serialised by an exclusive ``fcntl.flock`` on ``<folder>.lock`` (the kernel releases it
  when the process exits, however it exits); readers take it shared, so they never read a folder being swapped.
* A manifest is written into a temporary folder, each file fsynced, then renamed into place (the old folder is first
  renamed aside, then deleted), and the parent directory fsynced: a crash leaves the old manifest or the new one,
  never half of one.  Two ``effitrain select --force`` runs on the same key both succeed; the second replaces the
  first's (identical) manifest.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import numpy as np

from effitrain.fsutil import fsync_dir, sha256_file

log = logging.getLogger("effitrain.selection")

VERSION = 1  # bump when a scorer's arithmetic changes, so old manifests are not reused


def content_hash(ds: Any, columns: Iterable[str] = ("id", "text"), batch_size: int = 10000) -> str:
    """sha256 over the given columns, streamed in Arrow batches (never the whole split in Python lists)."""
    h = hashlib.sha256()
    cols = [c for c in columns if c in ds.column_names]
    h.update(("|".join(cols) + f"|{len(ds)}").encode())
    for batch in ds.select_columns(cols).with_format("arrow").iter(batch_size=batch_size):
        for c in cols:
            for value in batch.column(c).to_pylist():
                s = str(value).encode("utf-8", "surrogatepass")
                h.update(len(s).to_bytes(8, "little"))
                h.update(s)
    return h.hexdigest()


def manifest_key(*, pool_hash: str, target_hash: Optional[str], method: str, params: dict, seed: int) -> str:
    blob = json.dumps({"version": VERSION, "pool": pool_hash, "target": target_hash, "method": method,
                       "params": params, "seed": seed}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def manifest_dir(cache_root: Path, method: str, key: str) -> Path:
    return Path(cache_root) / f"{method}-{key[:16]}"


@contextlib.contextmanager
def locked(folder: Path, *, exclusive: bool) -> Iterator[None]:
    """``flock`` on ``<folder>.lock`` (exclusive for writers, shared for readers), released on any exit."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder.parent / f"{folder.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock (so does the process dying)


def load(folder: Path, key: str, n_candidates: Optional[int] = None) -> Optional[tuple[dict, np.ndarray]]:
    """``(header, candidate indices)`` of a complete, intact manifest with this key, else ``None``.

    A manifest that exists but fails a check (checksum, count, index range, unreadable) is reported with a warning:
    the caller then scores again and :func:`write` replaces it."""
    folder = Path(folder)
    if not (folder / "manifest.json").is_file():
        return None
    with locked(folder, exclusive=False):
        problem, result = _read_checked(folder, key, n_candidates)
    if problem:
        log.warning("selection manifest %s is not trusted (%s); scoring again and rewriting it", folder, problem)
    return result


def _read_checked(folder: Path, key: str, n_candidates: Optional[int]) -> tuple[Optional[str], Any]:
    try:
        header = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, None  # replaced between the look and the lock: a plain miss
    except (OSError, ValueError) as exc:
        return f"manifest.json unreadable: {exc}", None
    if not isinstance(header, dict) or header.get("key") != key:
        return "manifest.json holds another key", None
    expected = header.get("selected_sha256")
    if not expected:
        return "no checksum of selected.jsonl (written by an older effitrain)", None
    try:
        if sha256_file(folder / "selected.jsonl") != expected:
            return "selected.jsonl does not match its checksum (edited or damaged)", None
        with open(folder / "selected.jsonl", encoding="utf-8") as fh:
            idx = [json.loads(line)["index"] for line in fh]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"selected.jsonl unreadable: {exc}", None
    if len(idx) != (header.get("counts") or {}).get("kept_examples", -1):
        return f"{len(idx)} rows in selected.jsonl, the header says {header.get('counts')}", None
    index = np.asarray(idx, dtype=np.int64)
    if len(index) and (index.min() < 0 or (n_candidates is not None and index.max() >= n_candidates)):
        return f"an index out of range (candidates: {n_candidates})", None
    if n_candidates is not None and (header.get("counts") or {}).get("pool_examples", n_candidates) != n_candidates:
        return "written for another number of candidates", None
    return None, (header, index)


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def write(folder: Path, header: dict, index: np.ndarray, ids: list, scores: np.ndarray,
          clusters: Optional[np.ndarray] = None) -> Path:
    """Write atomically under the key's exclusive lock; returns the path of ``manifest.json``."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (ix, id_, sc) in enumerate(zip(index.tolist(), ids, scores.tolist())):
        row = {"index": ix, "id": id_, "score": float(sc)}
        if clusters is not None:
            row["cluster"] = int(clusters[i])
        lines.append(json.dumps(row) + "\n")
    selected = "".join(lines).encode("utf-8")
    header = {**header, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "selected_sha256": hashlib.sha256(selected).hexdigest()}
    with locked(folder, exclusive=True):
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        old = None
        try:
            _fsync_write(tmp / "selected.jsonl", selected)
            _fsync_write(tmp / "manifest.json",
                         (json.dumps(header, indent=2, sort_keys=True, default=str) + "\n").encode("utf-8"))
            mask = os.umask(0)
            os.umask(mask)
            os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes it private; a manifest folder is an ordinary one
            fsync_dir(tmp)
            if folder.exists():  # a stale, damaged or concurrent one with the same key: moved aside, then deleted
                old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=folder.parent))
                os.replace(folder, old / "m")
            os.replace(tmp, folder)
            fsync_dir(folder.parent)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    return folder / "manifest.json"
