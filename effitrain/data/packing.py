"""Tokenize and pack documents into fixed-length training sequences, one domain per sequence.

Packing (rather than padding) wastes no compute on pad tokens: every document is followed by the end-of-text token,
the documents of a domain are concatenated in their order, and the stream is cut into rows of exactly ``seq_len``
tokens; the incomplete last row of each domain is dropped.  Keeping domains apart costs at most one partial row per
domain, and gives every row a single ``domain`` label, which per-domain evaluation, domain mixtures and
domain-weighted methods (DoReMi-style) need.

Packed datasets are cached under ``<cache>/packed/<key>``, keyed by the documents' content, the tokenizer and
``seq_len``, and memory-mapped on reuse, so a warm start costs a fraction of a second.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np

from effitrain.data.cache import ContentHash, build_once, dataset_content_hash, quiet_progress
from effitrain.data.rows import column_numpy, stacked_rows

_FORMAT_VERSION = 1
_EMPTY = "EMPTY"  # marker file of a cached packing that produced no row
def _tokenize_batch(batch: dict, *, tokenizer: Any, eos_id: int) -> dict:
    # add_special_tokens=False: a named tokenizer may prepend BOS to every call; packing places its own
    # separators, one EOS after each document.
    encoded = tokenizer(batch["text"], add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return {"input_ids": [ids + [eos_id] for ids in encoded], "domain": batch["domain"]}


def tokenize_to(scratch: Path, ds, tokenizer: Any, num_proc: int):
    """Each document of ``ds`` as ``input_ids`` (+ EOS) with its ``domain``, written to ``scratch`` (an
    intermediate of a packing: the caller drops the folder once its rows are built)."""
    import datasets

    return ds.select_columns(["text", "domain"]).map(
        _tokenize_batch, batched=True, batch_size=1000, remove_columns=["text", "domain"],
        num_proc=num_proc if num_proc > 1 and len(ds) >= 2 * num_proc else None,
        fn_kwargs={"tokenizer": tokenizer, "eos_id": tokenizer.eos_token_id},
        features=datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32")),
                                    "domain": datasets.Value("string")}),
        cache_file_name=str(scratch / "tokenized.arrow"), load_from_cache_file=False, desc="tokenizing")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything about ``tokenizer`` that changes the ids it produces."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return ContentHash(type(tokenizer).__name__, body, tokenizer.eos_token_id).hexdigest()


def _pack_table(tokenized, seq_len: int):
    """Concatenate the token lists of each domain and cut them into rows of ``seq_len`` (an arrow table)."""
    import pyarrow as pa

    from effitrain.data.sources import domain_indices

    table = tokenized.with_format("arrow")[:]
    ids_column = table.column("input_ids")
    rows: list[np.ndarray] = []
    domains: list[np.ndarray] = []
    for domain, doc_rows in domain_indices(tokenized).items():  # sorted domain names: a deterministic row order
        # take() gathers the domain's documents in row order; flatten() concatenates their tokens.  Both are Arrow
        # kernels, so no Python work per token.
        stream = ids_column.take(pa.array(doc_rows)).combine_chunks().flatten().to_numpy()
        n = len(stream) // seq_len
        if n:
            rows.append(stream[: n * seq_len].astype(np.int32, copy=False))
            domains.append(np.full(n, domain, dtype=object))
    flat = np.concatenate(rows) if rows else np.zeros(0, np.int32)
    values = pa.array(flat, type=pa.int32())
    return pa.table({
        "input_ids": pa.FixedSizeListArray.from_arrays(values, seq_len),
        "domain": pa.array(np.concatenate(domains) if domains else np.zeros(0, object), type=pa.string()),
    })


def pack(ds, tokenizer: Any, seq_len: int, num_proc: int = 1, *, cache_dir: Optional[str | Path] = None):
    """Tokenize ``ds`` (columns ``text`` and ``domain``) and pack it into rows of exactly ``seq_len`` tokens.

    Returns a ``datasets.Dataset`` with ``input_ids`` (a fixed-length sequence of ``seq_len`` int32) and
    ``domain`` (str).  Rows are grouped by domain (domains in sorted order, documents in their order); the
    sampler decides the training order.  Tokenization runs through ``Dataset.map(batched=True, num_proc=...)``.
    The result is cached by content (documents, tokenizer, ``seq_len``), so every rank and every later run with
    the same inputs memory-maps the same files.
    """
    import datasets
    from datasets.table import InMemoryTable

    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"), length=seq_len),
                                  "domain": datasets.Value("string")})
    key = ContentHash("packed", _FORMAT_VERSION, dataset_content_hash(ds, ("text", "domain")),
                      tokenizer_fingerprint(tokenizer), seq_len).hexdigest()

    def build(out: Path) -> None:
        # The tokenized documents are an intermediate: written next to the output (same file system), dropped after.
        scratch = Path(tempfile.mkdtemp(prefix=".tokenized.", dir=out.parent))
        try:
            tokenized = tokenize_to(scratch, ds, tokenizer, num_proc)
            table = _pack_table(tokenized, seq_len)
            if table.num_rows == 0:  # save_to_disk writes no shard for an empty dataset; remember it explicitly
                (out / _EMPTY).write_text("no full sequence\n")
            else:
                datasets.Dataset(InMemoryTable(table), info=datasets.DatasetInfo(features=features)) \
                    .save_to_disk(str(out))
            del tokenized
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    with quiet_progress(len(ds)):
        folder = build_once("packed", key, build, cache_root=cache_dir)
    if (folder / _EMPTY).exists():
        return datasets.Dataset.from_dict({"input_ids": [], "domain": []}, features=features)
    return datasets.load_from_disk(str(folder))


def to_numpy(packed) -> np.ndarray:
    """The packed ``input_ids`` as an ``int32`` array of shape ``(rows, seq_len)``; for chat rows (with labels and
    position ids, :mod:`effitrain.data.chat_sources`) the channels stacked, ``(rows, 3, seq_len)`` or, for
    preference pairs, ``(rows, 2, 3, seq_len)``.

    Zero-copy over the memory-mapped Arrow file when it is a single chunk, so a training loop can gather a batch
    with ``tokens[indices]`` (then ``torch.from_numpy(...).long()``) without going through ``datasets`` per step.
    """
    if isinstance(packed, np.ndarray):  # rows already (the sharded engine's eval rows)
        return packed
    if hasattr(packed, "rows") and hasattr(packed, "domains"):  # token shards: rows read through memory maps
        return packed.rows
    rows = stacked_rows(packed)
    return column_numpy(packed, "input_ids") if rows is None else rows


def domain_codes(packed) -> tuple[np.ndarray, np.ndarray]:
    """``(codes, names)``: every packed row's domain as an index into ``names`` (numpy str).  Token shards give their
    memory-mapped per-row codes (read them in blocks), a ``datasets`` table its dictionary encoding."""
    from effitrain.data.sources import arrow_column

    if hasattr(packed, "rows") and hasattr(packed, "domain_codes"):
        return packed.domain_codes(), packed.domain_names
    if len(packed) == 0:
        return np.zeros(0, dtype=np.int32), np.zeros(0, dtype=str)
    encoded = arrow_column(packed, "domain").dictionary_encode()
    return (encoded.indices.to_numpy(zero_copy_only=False),
            np.asarray(encoded.dictionary.to_pylist(), dtype=str))


def domain_array(packed) -> np.ndarray:
    """The ``domain`` label of every packed row, as a numpy array of str."""
    codes, names = domain_codes(packed)
    return names[np.asarray(codes)] if len(codes) else np.zeros(0, dtype=str)
