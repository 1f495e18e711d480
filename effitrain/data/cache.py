"""Build-once folders in the effitrain cache, safe when several processes ask at the same time.

Every torchrun rank builds its data pipeline, so two processes routinely want the same demo corpus, tokenizer or
packed dataset at the same moment.  :func:`build_once` lets exactly one of them build it, into a temporary folder
that is renamed into place only when complete: a crash mid-build leaves no half-written cache entry, and the other
ranks wait on a file lock, then reuse the finished folder instead of building it again.

The completion marker records every file's size and SHA-256 (sizes only for folders over
:data:`_FULL_HASH_BYTES`); a folder whose files no longer match -- edited, truncated, deleted, or made by an older
effitrain without the record -- is rebuilt under the lock, with a warning.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from effitrain import paths
from effitrain.fsutil import sha256_file

_DONE = ".complete"  # written last inside the temporary folder: a folder without it is never trusted
_FULL_HASH_BYTES = 256 * 2**20  # folders up to this size are checked byte for byte on every reuse
log = logging.getLogger("effitrain.cache")


def _inventory(folder: Path) -> dict:
    """``{relative path: [size, sha256 or None]}`` of every file under ``folder`` except the marker."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != _DONE)
    full = sum(p.stat().st_size for p in files) <= _FULL_HASH_BYTES
    return {str(p.relative_to(folder)): [p.stat().st_size, sha256_file(p) if full else None] for p in files}


def verify(folder: Path) -> Optional[str]:
    """``None`` if ``folder`` is complete and the files recorded in its marker are unchanged, else the problem.

    Files added later are ignored: ``datasets`` writes its own ``cache-*.arrow`` files next to a dataset loaded
    with ``load_from_disk`` when it is mapped."""
    marker = folder / _DONE
    if not marker.is_file():
        return "no completion marker"
    try:
        recorded = json.loads(marker.read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if not isinstance(recorded, dict):
        return "no record of its files (made by an older effitrain)"
    for name, (size, digest) in recorded.items():
        path = folder / name
        try:
            if not path.is_file():
                return f"'{name}' is missing"
            if path.stat().st_size != size or (digest is not None and sha256_file(path) != digest):
                return f"'{name}' changed since it was built"
        except OSError as exc:
            return f"'{name}' unreadable ({exc})"
    return None


def cache_root(override: Optional[os.PathLike | str] = None) -> Path:
    """``override`` (the builders' ``cache_dir`` argument) or ``$EFFITRAIN_CACHE`` / ``~/.cache/effitrain``."""
    if override is not None:
        root = Path(override)
        root.mkdir(parents=True, exist_ok=True)
        return root
    return paths.cache_dir()


def build_once(kind: str, key: str, build: Callable[[Path], None], *,
               cache_root: Optional[os.PathLike | str] = None) -> Path:
    """Return ``<cache>/<kind>/<key>``, calling ``build(tmp_folder)`` to create it if it does not exist yet."""
    from filelock import FileLock

    parent = (Path(cache_root) if cache_root is not None else paths.cache_dir()) / kind
    parent.mkdir(parents=True, exist_ok=True)
    final = parent / key
    if (final / _DONE).exists() and verify(final) is None:
        return final
    with FileLock(str(parent / f"{key}.lock")):
        problem = verify(final) if final.exists() else None
        if final.exists() and problem is None:  # another process built it while we waited for the lock
            return final
        if final.exists():  # damaged, edited, or not ours (e.g. an empty folder made by hand): built again
            log.warning("cache %s is not trusted (%s); building it again", final, problem)
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=parent))
        try:
            build(tmp)
            (tmp / _DONE).write_text(json.dumps({"files": _inventory(tmp)}, sort_keys=True) + "\n")
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


class ContentHash:
    """An incremental SHA-256 over typed parts, so ``("ab", "c")`` and ``("a", "bc")`` never collide."""

    def __init__(self, *parts: object) -> None:
        self._h = hashlib.sha256()
        self.update(*parts)

    def update(self, *parts: object) -> "ContentHash":
        for part in parts:
            data = part if isinstance(part, (bytes, bytearray)) else str(part).encode("utf-8", "surrogatepass")
            self._h.update(len(data).to_bytes(8, "little"))
            self._h.update(data)
        return self

    def update_all(self, parts: Iterable[object]) -> "ContentHash":
        for part in parts:
            self.update(part)
        return self

    def hexdigest(self, n: int = 16) -> str:
        return self._h.hexdigest()[:n]


def _update_with_strings(h: "ContentHash", array) -> None:
    """Hash a string column by its row lengths and its characters, whatever its chunking or slicing."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
        h.update_all(array.to_pylist())  # not text (an int id column, say): exact, just slower
        return
    if array.null_count:
        array = pc.fill_null(array, "")
    h.update(str(array.type), len(array))
    if len(array) == 0:
        return
    _, offsets_buffer, data_buffer = array.buffers()
    width = np.int64 if pa.types.is_large_string(array.type) else np.int32
    offsets = np.frombuffer(offsets_buffer, dtype=width)[array.offset: array.offset + len(array) + 1]
    h.update(np.diff(offsets).astype(np.int64).tobytes())
    h.update(memoryview(data_buffer)[int(offsets[0]): int(offsets[-1])].tobytes())


def dataset_content_hash(ds, columns: Iterable[str] = ("id", "text", "domain")) -> str:
    """A hash of the values of ``columns`` of a ``datasets.Dataset``, in row order.

    ``datasets`` fingerprints are random for in-memory datasets (e.g. a selection built with ``from_list``), so
    caches keyed on them would miss every time.  Hashing the content is exact and, done on the Arrow buffers
    (not row by row in Python), costs about a second per GB of text.
    """
    from effitrain.data.sources import arrow_column

    cols = [c for c in columns if c in ds.column_names]
    h = ContentHash("rows", len(ds), *cols)
    for col in cols:
        _update_with_strings(h, arrow_column(ds, col))
    return h.hexdigest()


# Small builds print no progress bars (they are done before a bar would be read); big ones keep them.
_QUIET_BELOW_ROWS = 50_000


@contextlib.contextmanager
def quiet_progress(rows: int) -> Iterator[None]:
    """Hide `datasets` progress bars for builds of fewer than ``_QUIET_BELOW_ROWS`` rows, then restore them."""
    from datasets import utils as hf_tqdm

    if rows >= _QUIET_BELOW_ROWS or hf_tqdm.are_progress_bars_disabled():
        yield
        return
    hf_tqdm.disable_progress_bars()
    try:
        yield
    finally:
        hf_tqdm.enable_progress_bars()
