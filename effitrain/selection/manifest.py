"""Selection manifests: the chosen ids with their scores and the parameters, cached under a hash of the inputs.

Layout (``<selection cache>/<method>-<key[:16]>/``, the cache being ``$EFFITRAIN_CACHE/selection`` by default)::

    manifest.json   {"key", "method", "params", "seed", "inputs": {"pool", "target"}, "counts", "info", "created"}
    selected.jsonl  one line per kept example: {"index", "id", "score"[, "cluster"]}  (index = position among the
                    candidates, i.e. the train split after the target hold-out)

The key hashes the *content* of the pool's train split (ids and texts), of the target texts, the method, every
scorer/selector/budget parameter, the seed and :data:`VERSION`; any change gives a new key (a new manifest), the same
inputs find the old one.  The folder is written to a temporary name and renamed, so a crash never leaves half a
manifest where a later run would trust it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

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


def load(folder: Path, key: str) -> Optional[tuple[dict, np.ndarray]]:
    """``(header, candidate indices)`` of a complete manifest with this key, else ``None``."""
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        return None
    try:
        header = json.loads(path.read_text())
        if header.get("key") != key:
            return None
        idx = []
        with open(Path(folder) / "selected.jsonl") as fh:
            for line in fh:
                idx.append(json.loads(line)["index"])
    except (OSError, ValueError, KeyError):
        return None
    if len(idx) != header.get("counts", {}).get("kept_examples", -1):
        return None
    return header, np.asarray(idx, dtype=np.int64)


def write(folder: Path, header: dict, index: np.ndarray, ids: list, scores: np.ndarray,
          clusters: Optional[np.ndarray] = None) -> Path:
    """Write atomically; returns the path of ``manifest.json``."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        with open(tmp / "selected.jsonl", "w") as fh:
            for i, (ix, id_, sc) in enumerate(zip(index.tolist(), ids, scores.tolist())):
                row = {"index": ix, "id": id_, "score": float(sc)}
                if clusters is not None:
                    row["cluster"] = int(clusters[i])
                fh.write(json.dumps(row) + "\n")
        header = {**header, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (tmp / "manifest.json").write_text(json.dumps(header, indent=2, sort_keys=True, default=str) + "\n")
        if folder.exists():  # a stale or concurrent one with the same key: same inputs, same content
            shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder / "manifest.json"
