"""Dataset decomposition (Pouransari et al. 2024, arXiv 2405.13226): every document cut into pieces whose lengths are
powers of two, grouped into buckets of one length each — instead of concatenating documents and chunking the stream.

Why not concatenate-and-chunk
-----------------------------
A packed row of the ordinary packer (:mod:`effitrain.data.packing`) spans document boundaries: tokens attend to the
end of the previous, unrelated document.  Decomposition cuts each document on its own, so every training sequence
comes from exactly one document and no token ever attends across documents; training cost per step then depends on
the sequence length of the bucket, which the curriculum (:mod:`effitrain.curriculum.decomposition`) varies.

How a document is cut (the authors' ``get_binary``, ``scripts/make_dd_buckets.py`` of apple/ml-dataset-decomposition)
-------------------------------------------------------------------------------------------------------------------
The tokens (the document followed by its end-of-text token) are cut from the front: while ``n`` tokens remain, the
next piece has length ``2**k`` with ``k = floor(log2(n))`` — the binary representation of the length, largest piece
first.  A piece longer than the longest bucket is drawn instead with ``k`` in ``[min, max]``, shorter lengths more
likely (odds ``2**(max-k)``, as in the authors' code); what remains below the shortest bucket is dropped.  (The
authors' pieces hold ``2**k + 1`` tokens, because their loader shifts inputs and targets itself; ours hold ``2**k``
tokens and the model shifts them, the same convention as the packed rows.)

Storage
-------
The engine gathers batches from one ``[rows, seq_len]`` array.  A bucket of length ``l`` is stored as rows of
``seq_len`` tokens each holding ``seq_len / l`` pieces side by side (pieces of one domain, shuffled within the
bucket); the ``piece_len`` column says how to cut the row back into its pieces, which the curriculum's batch hook
does (``[B, seq_len] -> [B*seq_len/l, l]``).  A bucket's incomplete last row is dropped.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np

from effitrain.data.cache import ContentHash, build_once, dataset_content_hash, quiet_progress
from effitrain.registry import ConfigError

_FORMAT_VERSION = 1


def is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def decompose(n_tokens: int, *, min_len: int, max_len: int, rng: np.random.Generator) -> list[int]:
    """The piece lengths a document of ``n_tokens`` tokens is cut into, in order from its start (tokens beyond the
    last piece are dropped)."""
    lo, hi = int(math.log2(min_len)), int(math.log2(max_len))
    # the authors' odds for re-cutting a long document: k = hi, hi-1, ..., lo with weights 1, 2, 4, ...
    ks = np.arange(hi, lo - 1, -1)
    cumulative = np.cumsum(2.0 ** np.arange(len(ks)))
    cumulative /= cumulative[-1]
    pieces = []
    while n_tokens >= min_len:
        k = int(math.log2(n_tokens))
        if k > hi:  # an inverse-CDF draw: Generator.choice costs ~50x more per call
            k = int(ks[min(int(np.searchsorted(cumulative, rng.random(), side="right")), len(ks) - 1)])
        pieces.append(1 << k)
        n_tokens -= 1 << k
    return pieces


def _decomposed_table(tokenized, seq_len: int, min_len: int, seed: int):
    """Cut every tokenized document into pieces; group them into rows of one (domain, piece length) each."""
    import pyarrow as pa

    from effitrain.data.sources import domain_indices

    table = tokenized.with_format("arrow")[:]
    ids_column = table.column("input_ids")
    rows, domains, lengths = [], [], []
    for d_index, (domain, doc_rows) in enumerate(domain_indices(tokenized).items()):  # sorted domain names
        docs = ids_column.take(pa.array(doc_rows)).to_pylist()
        buckets: dict[int, list[np.ndarray]] = {}
        for i, doc in enumerate(docs):
            # one generator per document, so a document's cut depends only on the seed and its place in its domain
            rng = np.random.default_rng([seed % 2**63, d_index, i])
            start = 0
            for length in decompose(len(doc), min_len=min_len, max_len=seq_len, rng=rng):
                buckets.setdefault(length, []).append(np.asarray(doc[start:start + length], dtype=np.int32))
                start += length
        for length in sorted(buckets):
            pieces = buckets[length]
            per_row = seq_len // length
            order = np.random.default_rng([seed % 2**63, d_index, length]).permutation(len(pieces))
            n = len(pieces) // per_row
            if n == 0:
                continue
            flat = np.concatenate([pieces[j] for j in order[:n * per_row]])
            rows.append(flat)
            domains.append(np.full(n, domain, dtype=object))
            lengths.append(np.full(n, length, dtype=np.int32))
    flat = np.concatenate(rows) if rows else np.zeros(0, np.int32)
    return pa.table({
        "input_ids": pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.int32()), seq_len),
        "domain": pa.array(np.concatenate(domains) if domains else np.zeros(0, object), type=pa.string()),
        "piece_len": pa.array(np.concatenate(lengths) if lengths else np.zeros(0, np.int32), type=pa.int32()),
    })


def pack_decomposed(ds, tokenizer: Any, seq_len: int, min_len: int, *, seed: int = 0, num_proc: int = 1,
                    cache_dir: Optional[str | Path] = None):
    """Tokenize ``ds`` (columns ``text``, ``domain``) and decompose every document into power-of-two pieces.

    Returns a ``datasets.Dataset`` with ``input_ids`` (``seq_len`` int32: ``seq_len / piece_len`` pieces of one
    bucket side by side), ``domain`` and ``piece_len``; cached by content like :func:`effitrain.data.packing.pack`.
    """
    import datasets
    from datasets.table import InMemoryTable

    from effitrain.data.packing import tokenize_to, tokenizer_fingerprint

    if not (is_power_of_two(seq_len) and is_power_of_two(min_len) and min_len <= seq_len):
        raise ValueError(f"seq_len ({seq_len}) and min_len ({min_len}) must be powers of two, min_len <= seq_len")
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"), length=seq_len),
                                  "domain": datasets.Value("string"), "piece_len": datasets.Value("int32")})
    key = ContentHash("decomposed", _FORMAT_VERSION, dataset_content_hash(ds, ("text", "domain")),
                      tokenizer_fingerprint(tokenizer), seq_len, min_len, seed).hexdigest()

    def build(out: Path) -> None:
        scratch = Path(tempfile.mkdtemp(prefix=".tokenized.", dir=out.parent))
        try:
            tokenized = tokenize_to(scratch, ds, tokenizer, num_proc)
            table = _decomposed_table(tokenized, seq_len, min_len, seed)
            if table.num_rows == 0:
                raise ConfigError(f"dataset.min_piece_len: no bucket of the train split fills one row of {seq_len} "
                                  f"tokens with pieces of at least {min_len}; add documents or lower seq_len")
            datasets.Dataset(InMemoryTable(table), info=datasets.DatasetInfo(features=features)) \
                .save_to_disk(str(out))
            del tokenized
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    with quiet_progress(len(ds)):
        folder = build_once("packed", key, build, cache_root=cache_dir)
    return datasets.load_from_disk(str(folder))
