"""Fingerprints that key the selection's caches (a reference model's folder, a ``datasets.map`` over a pool) and the
process count of those maps: the lowest file of the package, shared by the pipeline, the reference model and the
scorers."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Optional


def model_fingerprint(path: str) -> str:
    """Name + modification times of the model folder's files: a changed model gives a new fingerprint."""
    h = hashlib.sha256(os.path.abspath(path).encode())
    if os.path.isdir(path):
        for name in sorted(os.listdir(path)):
            st = os.stat(os.path.join(path, name))
            h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def map_fingerprint(ds: Any, tag: str, payload: Any = None) -> str:
    """An explicit fingerprint for ``datasets.map`` (so it never has to hash a model or a closure)."""
    blob = json.dumps([getattr(ds, "_fingerprint", None), tag, payload], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def map_num_proc(num_proc: int, n: int) -> Optional[int]:
    """``datasets.map`` wants None for one process; never more processes than batches make sense for."""
    if num_proc <= 1 or n < 2 * num_proc:
        return None
    return num_proc
