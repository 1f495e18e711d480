"""Token shards: packed training rows as memory-mapped numpy arrays plus a small index.

A folder of token shards holds

* ``train-NNNNN.npy`` -- rows of exactly ``seq_len`` token ids, ``uint16`` when the vocabulary fits in 16 bits,
  else ``uint32`` (half the disk and page cache of int32 for most vocabularies);
* ``train-domains.npy`` -- the domain of every row, as a code into the index's ``domains`` (2 bytes a row);
* ``eval.npy`` / ``eval-domains.npy`` -- the held-out rows, the same way;
* ``train-piece_len.npy`` (``dataset.packing=decompose`` only) -- the piece length of every row's bucket
  (:mod:`effitrain.data.decompose`: a row holds ``seq_len / piece_len`` pieces of one document each);
* ``conditioned.npy`` / ``conditioned-mask.npy`` / ``conditioned-domains.npy`` (MeCo's metadata conditioning
  only) -- the train documents packed again after their metadata header, the loss mask of those rows (``False`` on
  the header tokens) and their domains;
* ``train-mask.npy`` / ``train-knotted.npy`` (Untie the Knots only, ``order: untie_knots``) -- the train rows'
  loss mask (``False`` on the markers and padding) and whether each row is knotted;
* ``index.json`` -- the format version, ``seq_len``, the dtype, the domain names and the rows of every shard, and
  ``order`` when the train rows are packed in a curriculum's document order (``in_context``: its chains).

Rows, not token streams, are stored because rows are what the samplers index: row ``i`` is one slice of one memory
map, so a random batch costs ``micro_batch_size`` reads and the exact resume of a sampler (it saves a position in
a permutation of row indices) works unchanged.  datatrove's own tokenized format (``.ds`` token streams with a
``.index`` of document ends) would need the packing -- which rows exist, where they start -- to be recomputed from
the document ends in every process at every start.

:class:`TokenShards` opens a folder; ``rows`` gathers batches as ``int32`` (what the loop and the curricula expect)
without ever loading a shard whole.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

FORMAT = "effitrain-token-shards"
VERSION = 1
INDEX = "index.json"
_SHARD_BYTES = 256 * 2**20  # a shard's target size: large sequential files, few open maps


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every id of a vocabulary of ``vocab_size`` entries."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _open(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError:  # an array with no element cannot be memory-mapped
        return np.load(path, allow_pickle=False)


def code_counts(codes: Any, n_names: int, block: int = 1 << 20) -> np.ndarray:
    """How many rows have each domain code (``int64 [n_names]``), the codes read a block at a time (token shards keep
    them memory-mapped, 2 bytes a row: never a name a row)."""
    counts = np.zeros(n_names, np.int64)
    for lo in range(0, len(codes), block):
        counts += np.bincount(np.asarray(codes[lo:lo + block]), minlength=n_names)[:n_names]
    return counts


class ShardRows:
    """The rows of several shards seen as one ``(rows, seq_len)`` array of ``dtype`` (``int32``: token ids as the
    loop reads them); indexing by an int, a slice or an array of indices reads only the rows asked for."""

    def __init__(self, parts: Sequence[np.ndarray], seq_len: int, dtype: Any = np.int32) -> None:
        if any(len(p) and p.shape[1] != seq_len for p in parts):
            raise ValueError(f"shard rows must all have {seq_len} columns, got {sorted({p.shape[1] for p in parts})}")
        self.parts = list(parts)
        self.dtype = np.dtype(dtype)
        self.offsets = np.concatenate([[0], np.cumsum([len(p) for p in self.parts])]).astype(np.int64)
        self.shape = (int(self.offsets[-1]), int(seq_len))
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, indices: Any) -> np.ndarray:
        if isinstance(indices, slice):
            indices = np.arange(*indices.indices(self.shape[0]), dtype=np.int64)
        scalar = np.ndim(indices) == 0
        idx = np.atleast_1d(np.asarray(indices, dtype=np.int64))
        idx = np.where(idx < 0, idx + self.shape[0], idx)
        if idx.size and (idx.min() < 0 or idx.max() >= self.shape[0]):
            raise IndexError(f"row index out of range [0, {self.shape[0]})")
        part = np.searchsorted(self.offsets, idx, side="right") - 1
        out = np.empty((*idx.shape, self.shape[1]), dtype=self.dtype)
        for k in np.unique(part):
            sel = part == k
            out[sel] = self.parts[int(k)][idx[sel] - self.offsets[k]]
        return out[0] if scalar else out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:  # np.asarray: every row (a copy)
        whole = self[np.arange(self.shape[0])]
        return whole if dtype is None else whole.astype(dtype, copy=False)


class TokenShards:
    """A folder of token shards: the packed training rows (``rows``), their domains and the eval rows."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.index = json.loads((self.folder / INDEX).read_text())
        if self.index.get("format") != FORMAT or self.index.get("version") != VERSION:
            raise ValueError(f"{self.folder} is not a version-{VERSION} {FORMAT} folder")
        self.seq_len = int(self.index["seq_len"])
        self.domain_names = np.asarray(self.index["domains"], dtype=str)
        self.rows = ShardRows([_open(self.folder / s["file"]) for s in self.index["shards"]], self.seq_len)
        self._domain_codes = _open(self.folder / "train-domains.npy")
        # the columns a datasets table of the same rows has (the decomposition curriculum asks for piece_len)
        self.column_names = ("input_ids", "domain", *(("piece_len",) if self.index.get("piece_len") else ()))
        # the curriculum whose document order the train rows were packed in (e.g. in_context's chains), or None
        self.packed_order: Optional[str] = self.index.get("order")

    def __len__(self) -> int:
        return len(self.rows)

    def domains(self) -> np.ndarray:
        """The domain name of every training row (numpy str)."""
        return self.domain_names[np.asarray(self._domain_codes)]

    def domain_codes(self) -> np.ndarray:
        """Every training row's domain as an index into ``domain_names``, memory-mapped (read it in blocks)."""
        return self._domain_codes

    def piece_len(self) -> np.ndarray:
        """Every training row's piece length (``dataset.packing=decompose``; 4 bytes a row)."""
        return np.asarray(_open(self.folder / "train-piece_len.npy"), dtype=np.int64)

    def conditioned(self) -> Optional[dict[str, Any]]:
        """MeCo's conditioned train rows as the in-memory packing gives them -- ``rows`` (int32), ``mask`` (bool,
        False on the metadata tokens), ``domain_codes`` (into ``domain_names``) -- read through memory maps; None
        when these shards were built without a metadata condition."""
        if "conditioned_rows" not in self.index:
            return None
        return {"rows": ShardRows([_open(self.folder / "conditioned.npy")], self.seq_len),
                "mask": ShardRows([_open(self.folder / "conditioned-mask.npy")], self.seq_len, dtype=bool),
                "domain_codes": _open(self.folder / "conditioned-domains.npy")}

    def row_mask(self) -> Optional[ShardRows]:
        """The train rows' loss mask (bool rows, True = a training target) of rows packed with one (Untie the Knots),
        else None."""
        path = self.folder / "train-mask.npy"
        return ShardRows([_open(path)], self.seq_len, dtype=bool) if path.is_file() else None

    def knotted(self) -> np.ndarray:
        """Whether each train row is knotted (Untie the Knots' shards), memory-mapped."""
        return _open(self.folder / "train-knotted.npy")

    def eval_by_domain(self) -> dict[str, np.ndarray]:
        """``{domain: int32 rows}`` of the held-out rows, domains sorted."""
        rows = np.asarray(_open(self.folder / "eval.npy"), dtype=np.int32)
        codes = np.asarray(_open(self.folder / "eval-domains.npy"))
        return {str(self.domain_names[c]): rows[codes == c] for c in sorted(set(codes.tolist()),
                                                                           key=lambda c: self.domain_names[c])}


class ShardWriter:
    """Writes rows into shard files in order (the number of rows is known before the first is written).

    The shards are appended with plain file writes, not filled through writable memory maps: the pages of a map the
    writer has touched count in its resident memory until it is closed, so a writer of memory maps grows with the
    corpus (a 1M-document corpus is about a gigabyte of rows), while written file pages belong to the page cache."""

    def __init__(self, folder: Path, *, seq_len: int, dtype: np.dtype, rows: int, eval_rows: int,
                 domains: Sequence[str], shard_rows: Optional[int] = None, piece_lengths: bool = False,
                 order: Optional[str] = None, conditioned_rows: Optional[int] = None) -> None:
        self.folder, self.seq_len, self.dtype = Path(folder), seq_len, np.dtype(dtype)
        self.order = order  # the curriculum whose order the train rows are packed in (None: domains in turn)
        self.domains = list(domains)
        if len(self.domains) > 2**16:
            raise ValueError("more than 65536 domains")
        per_shard = shard_rows or max(1, _SHARD_BYTES // (seq_len * self.dtype.itemsize))
        sizes = [min(per_shard, rows - start) for start in range(0, rows, per_shard)]
        self.shards = [{"file": f"train-{i:05d}.npy", "rows": n} for i, n in enumerate(sizes)]
        self._rows = rows
        self._shard = -1      # the shard being written (its file is self._out)
        self._room = 0        # rows it still takes
        self._out = None
        self._codes = _NpyAppender(self.folder / "train-domains.npy", np.dtype(np.uint16), (rows,))
        self._piece_len = _NpyAppender(self.folder / "train-piece_len.npy", np.dtype(np.int32), (rows,)) \
            if piece_lengths else None
        self._eval = np.zeros((eval_rows, seq_len), dtype=self.dtype)
        self._eval_codes = np.zeros(eval_rows, dtype=np.uint16)
        self._next = 0       # next training row
        self._next_eval = 0
        self._conditioned = None if conditioned_rows is None else (
            _NpyAppender(self.folder / "conditioned.npy", self.dtype, (conditioned_rows, seq_len)),
            _NpyAppender(self.folder / "conditioned-mask.npy", np.dtype(bool), (conditioned_rows, seq_len)),
            _NpyAppender(self.folder / "conditioned-domains.npy", np.dtype(np.uint16), (conditioned_rows,)))
        self._conditioned_rows = conditioned_rows

    def add(self, rows: np.ndarray, domain: Any, *, split: str = "train", piece_len: Optional[int] = None) -> None:
        """Append ``rows`` (``[n, seq_len]``) of ``domain`` (a name, or one name a row) to the training rows or
        (``split='eval'``) the eval rows; ``piece_len``: their bucket's piece length, for decomposed rows."""
        if isinstance(domain, str):
            code: Any = self.domains.index(domain)
        else:
            lookup = {d: c for c, d in enumerate(self.domains)}
            code = np.array([lookup[d] for d in domain], dtype=np.uint16)
        if split == "train" and (piece_len is None) != (self._piece_len is None):
            raise ValueError("token shards: piece_len is given for every train row of decomposed shards, and only "
                             "for those")
        if split == "eval":
            end = self._next_eval + len(rows)
            self._eval[self._next_eval:end] = rows
            self._eval_codes[self._next_eval:end] = code
            self._next_eval = end
            return
        if self._next + len(rows) > self._rows:
            raise RuntimeError(f"token shards: more than the {self._rows} train rows announced")
        self._codes.write(np.broadcast_to(np.asarray(code, dtype=np.uint16), (len(rows),)))
        if self._piece_len is not None:
            self._piece_len.write(np.full(len(rows), piece_len, dtype=np.int32))
        done = 0
        while done < len(rows):  # a block of rows may straddle two shards
            if self._room == 0:
                self._next_shard()
            take = min(len(rows) - done, self._room)
            self._out.write(rows[done:done + take])
            self._room -= take
            done += take
        self._next += len(rows)

    def add_conditioned(self, rows: np.ndarray, mask: np.ndarray, domain: str) -> None:
        """Append conditioned train rows of ``domain`` with their loss mask (shards built with ``conditioned_rows``)."""
        tokens, masks, codes = self._conditioned
        tokens.write(rows)
        masks.write(mask)
        codes.write(np.full(len(rows), self.domains.index(domain), dtype=np.uint16))

    def _next_shard(self) -> None:
        if self._out is not None:
            self._out.close()
        self._shard += 1
        shard = self.shards[self._shard]
        self._out = _NpyAppender(self.folder / shard["file"], self.dtype, (shard["rows"], self.seq_len))
        self._room = shard["rows"]

    def close(self) -> None:
        expected = sum(s["rows"] for s in self.shards)
        if self._next != expected or self._next_eval != len(self._eval):
            raise RuntimeError(f"token shards: wrote {self._next}/{expected} train and {self._next_eval}/"
                               f"{len(self._eval)} eval rows")
        if self._out is not None:
            self._out.close()
        self._codes.close()
        if self._piece_len is not None:
            self._piece_len.close()
        for appender in self._conditioned or ():
            appender.close()  # raises when a row announced was never written
        np.save(self.folder / "eval.npy", self._eval, allow_pickle=False)
        np.save(self.folder / "eval-domains.npy", self._eval_codes, allow_pickle=False)
        index = {"format": FORMAT, "version": VERSION, "seq_len": self.seq_len, "dtype": self.dtype.name,
                 "domains": self.domains, "shards": self.shards, "rows": expected, "eval_rows": len(self._eval),
                 **({"piece_len": True} if self._piece_len is not None else {}),
                 **({"order": self.order} if self.order else {}),
                 **({"conditioned_rows": self._conditioned_rows} if self._conditioned is not None else {})}
        (self.folder / INDEX).write_text(json.dumps(index, indent=1) + "\n")


class _NpyAppender:
    """A ``.npy`` file of a known shape written front to back: the header first, then the elements as they come
    (``np.load`` reads it like any ``np.save``'d array)."""

    def __init__(self, path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> None:
        self.path, self.dtype, self.shape = Path(path), np.dtype(dtype), shape
        self._fh = open(self.path, "wb")
        np.lib.format.write_array_header_1_0(self._fh, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                        "fortran_order": False, "shape": shape})
        self._left = int(np.prod(shape))

    def write(self, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values, dtype=self.dtype)
        if values.size > self._left:
            raise RuntimeError(f"{self.path.name}: more elements than its shape {self.shape}")
        self._fh.write(values.tobytes())
        self._left -= values.size

    def close(self) -> None:
        self._fh.close()
        if self._left:
            raise RuntimeError(f"{self.path.name}: {self._left} elements of its shape {self.shape} never written")
