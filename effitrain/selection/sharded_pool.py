"""What every sharded selection (issue 24, ``data.executor``) but DSIR shares: the pool stage, the target draw, reading
a few documents back from their files, and the exact global cut of a budget over per-task sorted scores.

* :class:`PoolCounts` (datatrove tasks): per file, every train document's record number, domain and budget weight
  (pre-tokenizer pieces, :func:`~effitrain.selection.base.count_tokens`); for ``dedup`` also its exact hash and
  MinHash signature (:mod:`effitrain.selection.sharded_dedup`).
* :func:`load_pool` (reduce): the files' arrays (numpy columns, a few bytes a candidate: no Python object per
  document anywhere in the reduce), the target drawn as
  :func:`~effitrain.selection.target.resolve_target` draws it (the same seeded permutation of the target domain's
  train documents, its texts read back from their files) and each file's offset among the candidates (the pool minus
  the target, in pool order = file order, then record order).
* :class:`SortedParts` (reduce): the global order of a selector -- ascending ``(primary, tie)`` -- is the merge of
  the tasks' sorted arrays; the window of it that holds the budget is found by binary searches over the tasks'
  cumulative weights (integers as float64: sums are exact in any order), so the reduce never holds the pool's scores,
  only the tasks' arrays as memory maps and the chosen documents.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from effitrain.data.engine import PipelineStep, _per_file, batched
from effitrain.registry import ConfigError
from effitrain.selection.base import count_tokens

_EPS = 1e-9  # the selectors' own slack on budget comparisons (selectors.take_until, WindowSelector)


def require_whole_pool_selector(params: Any, method: str, selector: str) -> None:
    """The sharded form of ``method`` runs its own ``selector`` over the whole pool; ``check`` refuses the rest
    (config/blocks/data_engine.py), this guards a selection built without it."""
    if params.selector["name"] != selector or getattr(params, "domains", None) is not None:
        raise ConfigError(f"selection: data.executor runs {method} with its {selector} selector over the whole pool; "
                          f"drop selection.selector / selection.domains or data.executor")


def save_npz(path: Path, **arrays: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def save_arrays(folder: Path, **arrays: Any) -> None:
    """One ``.npy`` per array (each can be memory-mapped), published by renaming the folder: a killed task leaves
    no folder that looks finished."""
    import shutil

    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, array in arrays.items():
        np.save(tmp / f"{name}.npy", array)
    shutil.rmtree(folder, ignore_errors=True)  # a rerun of a task killed after its rename
    os.rename(tmp, folder)


def load_arrays(folder: Path) -> dict:
    """The arrays of :func:`save_arrays` as read-only memory maps (an empty one is loaded: it cannot be mapped)."""
    out = {}
    for path in folder.glob("*.npy"):
        try:
            out[path.stem] = np.load(path, mmap_mode="r")
        except ValueError:
            out[path.stem] = np.load(path)
    return out


class PoolCounts(PipelineStep):
    """Per file ``pool/NNNNNN.npz``: ``record``, ``domain`` (codes into ``domains``) and ``weight`` of its train
    documents (the eval hold-out skipped); with ``dedup`` (the scorer's parameters) also ``exact`` (the SHA-1 of the
    normalized text, as the in-memory scorer keys its exact duplicates) and ``sig/NNNNNN.npy``, the MinHash
    signatures (``uint32`` when every value fits, as datasketch's 32-bit scheme's do).  A task streams its files
    ``BLOCK`` documents at a time: it holds one block's texts and shingles and a few bytes a document of the file
    (its columns as numpy arrays), the signatures go to disk as they are computed."""

    name = "effitrain pool"
    type = "🔢 - FEATURES"

    def __init__(self, out_dir: str, *, eval_docs: str, dedup: Optional[dict] = None) -> None:
        super().__init__()
        self.out_dir, self.eval_docs, self.dedup = out_dir, eval_docs, dedup

    def run(self, data: Any = None, rank: int = 0, world_size: int = 1) -> Iterator[Any]:
        eval_set = eval_pairs(self.eval_docs)
        out = Path(self.out_dir)
        for file_index, docs in _per_file(data):
            train = (d for d in docs if (file_index, d.metadata["record"]) not in eval_set)
            columns = ColumnBlocks()
            domains = DomainCodes()
            sig = RowsFile(out / "sig" / f"{file_index:06d}.npy", np.uint64, width=self.dedup["num_perm"],
                           narrow=np.uint32) if self.dedup is not None and self.dedup["near"] else None
            for block in batched(train, BLOCK):  # a block of documents at a time, never the file's
                columns.add(record=np.array([d.metadata["record"] for d in block], dtype=np.int64),
                            domain=domains.codes([d.metadata["domain"] for d in block]),
                            weight=np.array([count_tokens(d.text) for d in block], dtype=np.int64))
                if self.dedup is not None:
                    from effitrain.selection.scorers.dedup import _signatures

                    d = self.dedup
                    s = _signatures({"text": [doc.text for doc in block]}, d["num_perm"], d["shingle"],
                                    d["shingle_size"], d["near"])
                    columns.add(exact=np.array([bytes.fromhex(h) for h in s["exact"]], dtype="S20"))
                    if sig is not None:
                        sig.append(np.stack(s["minhash"]).astype(np.uint64))
            arrays = columns.arrays({"record": np.int64, "domain": np.int32, "weight": np.int64, "exact": "S20"})
            if self.dedup is None:
                arrays.pop("exact")
            names, arrays["domain"] = domains.sorted(arrays["domain"])
            arrays["domains"] = np.array(names, dtype=str)
            if sig is not None:
                sig.publish()
            save_npz(out / "pool" / f"{file_index:06d}.npz", **arrays)
            self.stat_update("files")
        return iter(())


BLOCK = 1024  # documents a map task holds at once (the tests lower it to cut files into several blocks)


def eval_pairs(path: str) -> set:
    """The eval hold-out's ``(file, record)`` pairs (a few hundred a domain: the scan's ``holdout``)."""
    return set(map(tuple, np.load(path).tolist()))


class ColumnBlocks:
    """Numeric columns collected a block at a time as numpy arrays (a few bytes a document, not a Python object)."""

    def __init__(self) -> None:
        self.blocks: dict[str, list] = {}

    def add(self, **arrays: np.ndarray) -> None:
        for name, array in arrays.items():
            self.blocks.setdefault(name, []).append(array)

    def arrays(self, dtypes: dict) -> dict:
        return {k: np.concatenate(self.blocks[k]) if self.blocks.get(k) else np.zeros(0, dtype=dt)
                for k, dt in dtypes.items()}


class DomainCodes:
    """Domain names -> codes as they come, then renumbered in sorted name order (the pool files' convention)."""

    def __init__(self) -> None:
        self.code: dict[str, int] = {}

    def codes(self, names: list) -> np.ndarray:
        return np.array([self.code.setdefault(n, len(self.code)) for n in names], dtype=np.int32)

    def sorted(self, codes: np.ndarray) -> tuple[list, np.ndarray]:
        names = sorted(self.code)
        renumber = np.zeros(len(self.code), dtype=np.int32)
        for i, n in enumerate(names):
            renumber[self.code[n]] = i
        return names, renumber[codes] if len(codes) else codes.astype(np.int32)


class RowsFile:
    """A ``.npy`` of rows written a block at a time (raw rows appended to a temporary file, then published under
    ``path`` in one rename), so a task holds one block of rows, not a file's or a task's.  ``narrow``: the dtype to
    publish in instead when every value fits it (MinHash values: datasketch's 32-bit scheme's fit ``uint32``)."""

    def __init__(self, path: Path, dtype: Any, *, width: int = 0, narrow: Any = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.dtype, self.width, self.rows = path, np.dtype(dtype), width, 0
        self.narrow = None if narrow is None else np.dtype(narrow)
        self.raw = path.with_name(f".{path.stem}.tmp{os.getpid()}.raw")
        self.fh = open(self.raw, "wb")

    def append(self, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values, dtype=self.dtype)
        if not len(values):
            return
        self.width = values.shape[1]
        if self.narrow is not None and (values < np.iinfo(self.narrow).min).any() | \
                (values > np.iinfo(self.narrow).max).any():
            self.narrow = None
        self.fh.write(values.tobytes())
        self.rows += len(values)

    def publish(self) -> None:
        self.fh.close()
        dtype = self.narrow or self.dtype
        src = np.memmap(self.raw, dtype=self.dtype, mode="r", shape=(self.rows, self.width)) if self.rows else None
        tmp = self.path.with_name(f".{self.path.stem}.tmp{os.getpid()}.npy")
        with open(tmp, "wb") as fh:
            np.lib.format.write_array_header_1_0(fh, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                      "fortran_order": False, "shape": (self.rows, self.width)})
            for i in range(0, self.rows, BLOCK):
                fh.write(np.asarray(src[i:i + BLOCK]).astype(dtype).tobytes())
        del src
        os.replace(tmp, self.path)
        self.raw.unlink()


@dataclass
class Pool:
    """The reduce's view of the pool: per file with train documents, its arrays (``record``, ``domain`` codes,
    ``domains``, ``weight``, maybe ``exact``), the candidates (the target held out) and their offsets."""

    files: list                    # [(file index, arrays)] in file order
    held: set                      # (file, record) of the target documents drawn from the pool
    target_texts: list             # the target's texts in the in-memory order (empty without a target)
    candidate: dict                # file -> bool mask over its documents: not a target document
    offset: dict                   # file -> position of its first candidate among all candidates

    @property
    def candidates(self) -> int:
        return int(sum(m.sum() for m in self.candidate.values()))

    def weights_total(self, unit: str) -> float:
        return float(sum(float(a["weight"][self.candidate[f]].sum()) if unit == "tokens"
                         else float(self.candidate[f].sum()) for f, a in self.files))


def read_texts(corpus: Any, pairs: Sequence[tuple[int, int]]) -> dict:
    """``{(file, record): text}`` for a few documents, read back from their files."""
    from effitrain.data.records import RecordFile

    by_file: dict[int, set] = {}
    for f, r in pairs:
        by_file.setdefault(int(f), set()).add(int(r))
    out = {}
    for f, records in sorted(by_file.items()):
        last = max(records)
        for record in RecordFile(corpus.files[f], corpus.fmt, text_field=corpus.text_field,
                                 domain_field=corpus.domain_field):
            if record.index in records:
                out[(f, record.index)] = record.text
            if record.index >= last:  # records come in order: the rest of the file holds none of them
                break
    return out


def draw_target(target: Any, domain_docs: np.ndarray, domains: set, corpus: Any, seed: int) -> tuple[list, set]:
    """``(target texts, {(file, record)} held out of the candidates)``; ``domain_docs``: the ``(file, record)`` rows
    (an ``(n, 2)`` integer array) of the target domain's train documents in pool order.  The draw is
    :func:`resolve_target`'s: ``np.sort`` of the seeded permutation's first ``max_examples`` positions, so the texts
    come in pool order."""
    if target is None:
        return [], set()
    if target.domain is None:
        from effitrain.selection.target import resolve_target

        drawn, _ = resolve_target(target, {"train": []}, seed)
        return list(drawn["text"]), set()
    if target.split != "train":
        raise ConfigError(f"selection.target.split: data.executor draws a target domain from the train split, not "
                          f"'{target.split}'; use split: train or selection.target.path")
    if not len(domain_docs):
        raise ConfigError(f"selection.target.domain: no '{target.domain}' examples in the train split; domains: "
                          f"{', '.join(sorted(domains))}")
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.permutation(len(domain_docs))[:target.max_examples])  # pool order = (file, record) order
    chosen = [(int(f), int(r)) for f, r in np.asarray(domain_docs)[rows]]
    texts = read_texts(corpus, chosen)
    return [texts[c] for c in chosen], set(chosen)


def domain_rows(files: list, domain: Optional[str]) -> np.ndarray:
    """The ``(file, record)`` rows of ``domain``'s documents over the pool files ``[(file, arrays)]``, pool order."""
    out = [np.zeros((0, 2), dtype=np.int64)]
    for f, a in files:
        names = a["domains"].tolist()
        if domain is not None and domain in names:
            records = a["record"][a["domain"] == names.index(domain)]
            out.append(np.stack([np.full(len(records), f, dtype=np.int64), records.astype(np.int64)], axis=1))
    return np.concatenate(out)


def load_pool(work: Path, n_files: int, target: Any, corpus: Any, seed: int) -> Pool:
    files, domains = [], set()
    for f in range(n_files):
        path = work / "pool" / f"{f:06d}.npz"
        if not path.is_file():  # no train document in this file
            continue
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
        domains.update(arrays["domains"].tolist())
        files.append((f, arrays))
    texts, held = draw_target(target, domain_rows(files, None if target is None else target.domain), domains,
                              corpus, seed)
    candidate, offset, position = {}, {}, 0
    for f, a in files:
        candidate[f] = ~np.isin(a["record"], [r for ff, r in held if ff == f])
        offset[f] = position
        position += int(candidate[f].sum())
    return Pool(files, held, texts, candidate, offset)


def candidate_column(pool: Pool, name: str, dtype: Any = None) -> np.ndarray:
    """One column of the pool files (``record``, ``weight``, ``exact``...) over the candidates, in pool order."""
    parts = [a[name][pool.candidate[f]] for f, a in pool.files]
    out = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype or np.int64)
    return out if dtype is None else out.astype(dtype, copy=False)


def candidate_pairs(pool: Pool, positions: Optional[np.ndarray] = None) -> np.ndarray:
    """The ``(file, record)`` rows (``(k, 2)`` int64) of the candidates at global ``positions`` (sorted; all of them
    when None)."""
    out = [np.zeros((0, 2), dtype=np.int64)]
    positions = None if positions is None else np.asarray(positions, dtype=np.int64)
    i = 0
    for f, a in pool.files:
        records = a["record"][pool.candidate[f]].astype(np.int64)
        if positions is not None:
            lo = pool.offset[f]
            j = i + int(np.searchsorted(positions[i:], lo + len(records), "left"))
            records, i = records[positions[i:j] - lo], j
        out.append(np.stack([np.full(len(records), f, dtype=np.int64), records], axis=1))
    return np.concatenate(out)


def draws(seed: int, start: int, n: int) -> np.ndarray:
    """``rng.random(size=...)[start:start + n]`` of ``default_rng(seed)``: the selectors' tie-breaking draws of the
    candidates ``start..start + n`` (one 64-bit output per double, so the stream can be advanced to ``start``)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    rng.bit_generator.advance(start)
    return rng.random(size=n)


def plan_json(path: Path, pool: Pool, **extra: Any) -> None:
    """What a score task needs of the reduce: per file its candidate offset and the target records it skips."""
    files = {str(f): {"offset": pool.offset[f], "skip": a["record"][~pool.candidate[f]].tolist()}
             for f, a in pool.files}
    path.write_text(json.dumps({"files": files, **extra}))


# ------------------------------------------------------------------------------------------------- the global cut
class SortedParts:
    """The tasks' candidates, each task's sorted ascending by ``(primary, tie)`` with ``cumw`` its running weight
    (inclusive).  The global order is their merge; ``window`` returns the documents of the global window the
    in-memory selectors cut (:class:`~effitrain.selection.selectors.WindowSelector`, and ``TopKSelector`` as the
    window from the start).  Two documents with the same ``(primary, tie)`` -- the same score and the same 53-bit
    random draw -- would be kept or dropped together; in memory their pool order decides."""

    def __init__(self, parts: list[dict]) -> None:
        self.parts = [p for p in parts if len(p["primary"])]

    def _le(self, p: int, t: float, side: str) -> list[int]:
        """Per part, how many of its items are ``<= (p, t)`` (``side='right'``) or ``< (p, t)`` (``'left'``)."""
        out = []
        for a in self.parts:
            p = np.uint64(p)
            lo = int(np.searchsorted(a["primary"], p, "left"))
            hi = int(np.searchsorted(a["primary"], p, "right"))
            out.append(lo + int(np.searchsorted(a["tie"][lo:hi], t, side)))
        return out

    def _mass(self, counts: list[int]) -> float:
        return float(sum(float(a["cumw"][n - 1]) for a, n in zip(self.parts, counts) if n))

    def total(self) -> float:
        return self._mass([len(a["primary"]) for a in self.parts])

    def first_where(self, reached) -> Optional[tuple[int, float]]:
        """The least item ``x`` whose mass up to and including it satisfies ``reached`` (monotone), or None."""
        best = None
        for a in self.parts:
            lo, hi = 0, len(a["primary"])
            while lo < hi:  # the first of this part's items that reaches
                mid = (lo + hi) // 2
                if reached(self._mass(self._le(a["primary"][mid], float(a["tie"][mid]), "right"))):
                    hi = mid
                else:
                    lo = mid + 1
            if lo < len(a["primary"]):
                item = (np.uint64(a["primary"][lo]), float(a["tie"][lo]))
                best = item if best is None or item < best else best
        return best

    def window(self, start_mass: float, budget: float) -> list[np.ndarray]:
        """Per part, the indices of its items in the global window: from the first item whose cumulative weight
        passes ``start_mass`` (the first item when it is 0), up to the first whose weight from there reaches
        ``budget`` (inclusive; to the end when none does)."""
        if not self.parts:
            return []
        first = self.first_where(lambda m: m > start_mass + _EPS) if start_mass > 0 else self.first_where(
            lambda m: True)
        if first is None:
            return [np.zeros(0, dtype=np.int64) for _ in self.parts]
        begin = self._le(*first, "left")
        base = self._mass(begin)
        last = self.first_where(lambda m: m - base >= budget - _EPS)
        end = [len(a["primary"]) for a in self.parts] if last is None else self._le(*last, "right")
        return [np.arange(b, max(b, e), dtype=np.int64) for b, e in zip(begin, end)]


def ordered_key(x: np.ndarray) -> np.ndarray:
    """float64 -> uint64 with the order numpy sorts floats in: -0.0 as 0.0 and every NaN last, after +inf (as
    ``np.lexsort`` places them), so the reduce compares plain integers."""
    x = np.asarray(x, dtype=np.float64) + 0.0  # -0.0 + 0.0 is 0.0
    bits = np.where(np.isnan(x), np.nan, x).view(np.uint64)  # one NaN: the positive quiet one, above +inf
    return np.where(bits >> np.uint64(63), ~bits, bits | np.uint64(1 << 63))


def sort_part(primary: np.ndarray, tie: np.ndarray, weight: np.ndarray, **rest: np.ndarray) -> dict:
    """One task's candidates in the selector's ascending order; ``primary``: float64 scores, NaN allowed."""
    primary = ordered_key(primary)
    order = np.lexsort((tie, primary))
    out = {"primary": primary[order], "tie": tie[order], "weight": weight[order],
           "cumw": np.cumsum(weight[order], dtype=np.float64)}
    return {**out, **{k: v[order] for k, v in rest.items()}}


def digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
