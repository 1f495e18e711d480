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
from effitrain.registry import ConfigError

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
    from effitrain.data.chat_sources import stacked_rows

    rows = stacked_rows(packed)
    return column_numpy(packed, "input_ids") if rows is None else rows


def column_numpy(packed, name: str) -> np.ndarray:
    """One fixed-length integer column as a ``(rows, length)`` array."""
    column = packed.with_format("arrow")[:].column(name)
    seq_len = column.type.list_size
    chunks = column.chunks
    if len(chunks) == 1 and chunks[0].offset == 0:
        values = chunks[0].values
        try:
            flat = values.to_numpy(zero_copy_only=True)
        except Exception:  # nulls or an unexpected layout: fall back to a copy
            flat = values.to_numpy(zero_copy_only=False)
        flat = flat[: len(chunks[0]) * seq_len]
    else:
        flat = column.combine_chunks().flatten().to_numpy()
    return flat.reshape(-1, seq_len)


def domain_array(packed) -> np.ndarray:
    """The ``domain`` label of every packed row, as a numpy array of str."""
    from effitrain.data.sources import arrow_column

    if hasattr(packed, "rows") and hasattr(packed, "domains"):  # token shards keep a small per-row index
        return packed.domains()
    if len(packed) == 0:
        return np.zeros(0, dtype=str)
    encoded = arrow_column(packed, "domain").dictionary_encode()
    names = np.asarray(encoded.dictionary.to_pylist(), dtype=str)
    return names[encoded.indices.to_numpy(zero_copy_only=False)]


def build_packed_splits(dataset_params: Any, model_params: Any, raw, *, cache_dir: Optional[str | Path] = None,
                        tokenizer_corpus: Any = None):
    """From the documents to what the engine trains on: ``(tokenizer, packed_train, packed_eval_by_domain)``.

    * ``raw``: the ``DatasetDict`` with ``train`` (after selection) and ``eval`` splits;
    * the tokenizer comes from :func:`effitrain.data.tokenizer.build_tokenizer` (a BPE is trained on
      ``tokenizer_corpus``, default ``train``; the engine passes the whole pool, so that runs with different data
      selections share one tokenizer and their per-token losses stay comparable);
    * ``packed_train``: every train document packed to ``dataset_params.seq_len``;
    * ``packed_eval_by_domain``: ``{domain: packed eval rows of that domain}`` in sorted domain order.

    Raises ConfigError when the train split yields no full sequence or an eval domain yields none, naming the
    settings to change.
    """
    from effitrain.data.sources import domain_indices
    from effitrain.data.tokenizer import build_tokenizer

    if getattr(dataset_params, "format", "text") in ("chat", "preference", "prompts"):  # conversations: own rows
        from effitrain.data.chat_sources import build_chat_splits

        return build_chat_splits(dataset_params, model_params, raw, cache_dir=cache_dir,
                                 tokenizer_corpus=tokenizer_corpus)
    seq_len = dataset_params.seq_len
    num_proc = getattr(dataset_params, "num_proc", 1)
    with quiet_progress(len(raw["train"])):
        corpus = raw["train"] if tokenizer_corpus is None else tokenizer_corpus
        tokenizer = build_tokenizer(model_params, corpus, cache_dir=cache_dir)
        # generated documents join the train split after the tokenizer is trained, so the tokenizer (and the
        # per-token eval losses) stay those of runs without them
        from effitrain.data.procedural import with_procedural

        train_docs = with_procedural(raw["train"], dataset_params)
        control = getattr(dataset_params, "control_tokens", None)
        if control is not None:  # conditional training: a control token before every rated segment
            from effitrain.console import say
            from effitrain.data.conditional import condition_documents

            tokenizer, train_docs, info = condition_documents(train_docs, tokenizer, control,
                                                              seed=getattr(dataset_params, "seed", 0))
            say(f"control tokens: {info['good']} {control.good_token} / {info['bad']} {control.bad_token} of "
                f"{info['segments']} {control.segment} segments ({info['without_token']} without), threshold "
                f"{info['threshold']:.4g} ({'<=' if control.good_when == 'low' else '>='} is good)")
        if getattr(dataset_params, "packing", "concatenate") == "decompose":
            from effitrain.data.decompose import pack_decomposed

            packed_train = pack_decomposed(train_docs, tokenizer, seq_len, dataset_params.min_piece_len,
                                           seed=getattr(dataset_params, "seed", 0), num_proc=num_proc,
                                           cache_dir=cache_dir)
        else:
            packed_train = pack(train_docs, tokenizer, seq_len, num_proc, cache_dir=cache_dir)
        if len(packed_train) == 0:
            raise ConfigError(f"dataset.seq_len: the train split has fewer than {seq_len} tokens in every domain; "
                              f"lower seq_len or add documents")
        packed_eval = pack(raw["eval"], tokenizer, seq_len, num_proc, cache_dir=cache_dir)
        by_domain = {}
        rows = domain_indices(packed_eval)
        for domain in sorted(domain_indices(raw["eval"])):
            if domain not in rows:
                raise ConfigError(f"dataset.eval_examples_per_domain: the eval documents of domain '{domain}' make "
                                  f"less than one sequence of {seq_len} tokens; raise it or lower dataset.seq_len")
            by_domain[domain] = packed_eval.select(rows[domain])
    return tokenizer, packed_train, by_domain

