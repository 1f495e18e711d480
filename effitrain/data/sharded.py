"""The data stage of a run over a corpus of files, as sharded jobs (``data.executor``): map, small reduce, map,
streaming reduce -- giving exactly the rows of the in-memory path (:func:`effitrain.data.packing.build_packed_splits`
on ``dataset=local``) as memory-mapped token shards (:mod:`effitrain.data.shards`).

1. **scan** (datatrove tasks, :mod:`effitrain.data.engine`): per file, each document's record number, domain and
   hold-out rank; per task, its best candidates for the tokenizer's training sample.
2. **hold-out and sample** (reduce, this process): the eval documents are, per domain, the ``k`` lowest hash ranks of
   their ids -- a global top-k merged from per-file top-k (the ranks of positional ids ``train-<row>`` are computed
   here, where the record offsets of the files are known); the BPE sample is the merged top of the tasks' candidates
   without the eval documents.  Both are cached (``<cache>/data_scan/<key>``): a later run skips the scan.
3. **tokenize** (datatrove tasks): per file, one token stream per split and domain.
4. **pack** (reduce, this process): per domain in sorted order, the files' streams concatenated in file order and cut
   into rows of ``seq_len``; the last partial row of a domain dropped.  Sequential reads and writes, memory of one
   read block; the shards go to ``<cache>/token_shards/<key>`` (built once, atomically).

The work folders of the tasks (``<cache>/data_engine/<key>-<tasks>t``) are kept until their reduce is done, so a
relaunch after a crash reruns only the tasks that had not marked themselves complete.

Input files are identified by path, size and modification time, not by their bytes: hashing a corpus of terabytes on
every launch would cost a pass over it.  Replacing a file (or ``touch``) rebuilds.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np

from effitrain.console import say
from effitrain.data.cache import ContentHash, build_once, cache_root
from effitrain.registry import ConfigError

_VERSION = 1
_READ_BLOCK = 1 << 22  # tokens read per block in the pack reduce (16 MiB of uint32)


def corpus_files(patterns: Sequence[str], key: str = "dataset.path") -> list[str]:
    """Files, globs or folders (every data file under a folder, recursively), as the in-memory path reads them."""
    from effitrain.data import sources

    return sources.resolve_files(patterns, key)


def _files_identity(files: Sequence[str]) -> str:
    h = ContentHash("files", len(files))
    for f in files:
        st = os.stat(f)
        h.update(f, st.st_size, st.st_mtime_ns)
    return h.hexdigest()


def scan_and_select(dataset_params: Any, data_params: Any, *, selection: Any = None, bpe: bool = False,
                    cache_dir: Optional[str | Path] = None) -> tuple["_Corpus", Path, Optional[Path]]:
    """The corpus checked and scanned (hold-out, BPE sample when ``bpe``) and, with a ``selection`` hook, its kept
    documents: ``(corpus, scan folder, selected.npy or None)``, each cached by content.  The first half of
    :func:`build_sharded_splits`, on its own for what needs no tokenizer (a selection's benchmark)."""
    from effitrain.data import sources
    from effitrain.data.inspect import SMALL_BYTES, inspect_files
    from effitrain.data.tokenizer import BPE_SAMPLE_DOCS

    files = corpus_files(dataset_params.path)
    fmt = sources.file_format(files, "dataset.path")
    if fmt not in ("json", "parquet"):
        raise ConfigError(f"dataset.path: data.executor reads JSON lines and parquet files, not {fmt}; convert the "
                          f"files or drop data.executor")
    if fmt == "json":  # a .json file may be one JSON array, which cannot be streamed a record at a time
        whole = [f for f in files if ".jsonl" not in Path(f).name.lower()]
        if whole:
            raise ConfigError(f"dataset.path: data.executor streams JSON lines (.jsonl, .jsonl.gz) and parquet; "
                              f"'{whole[0]}' is a .json file -- rename it to .jsonl if it holds one object a line")
    small = sum(os.path.getsize(f) for f in files) <= SMALL_BYTES
    inspect_files(files, fmt, key="dataset.path", text_field=dataset_params.text_field,
                  domain_field=dataset_params.domain_field, deep=small)
    root = cache_root(cache_dir)
    holdout = 0 if dataset_params.eval_path else dataset_params.eval_examples_per_domain
    corpus = _Corpus(files, fmt, dataset_params.text_field, dataset_params.domain_field, dataset_params.domains)
    scan_key = ContentHash("scan", _VERSION, _files_identity(files), corpus.text_field, corpus.domain_field,
                           corpus.domains, holdout, BPE_SAMPLE_DOCS if bpe else 0).hexdigest()
    scanned = build_once("data_scan", scan_key, lambda out: _scan(out, corpus, data_params, root / "data_engine" /
                                                                  f"{scan_key}-{data_params.tasks}t",
                                                                  holdout=holdout,
                                                                  sample_docs=BPE_SAMPLE_DOCS if bpe else 0),
                         cache_root=root)
    selected = None
    if selection is not None:
        select_key = ContentHash("selection", _VERSION, scan_key, *selection.key_parts()).hexdigest()
        chosen = build_once("data_selection", select_key,
                            lambda out: selection(out, corpus, scanned / "eval_docs.npy", data_params,
                                                  root / "data_engine" / f"{select_key}-{data_params.tasks}t"),
                            cache_root=root)
        selection.info = {**json.loads((chosen / "info.json").read_text()), "manifest": str(chosen)}
        selected = chosen / "selected.npy"
    return corpus, scanned, selected


def build_sharded_splits(dataset_params: Any, model_params: Any, data_params: Any, *,
                         cache_dir: Optional[str | Path] = None, selection: Any = None, order: Any = None,
                         condition: Optional[tuple[str, str, str]] = None,
                         knots: Optional[tuple[int, float, bool, int]] = None):
    """``(tokenizer, TokenShards, {domain: int32 eval rows})`` for ``dataset=local`` with ``data.executor`` set.

    ``selection``, from a layer above (e.g. :class:`effitrain.selection.sharded_dsir.ShardedDSIR`): called as
    ``selection(out, corpus, eval_docs, data_params, work)`` it writes ``out/selected.npy``, the ``(file, record)``
    pairs of the train documents to keep, and ``out/info.json``; its ``key_parts()`` name what it depends on.  The
    tokenizer is still trained on the whole pool, as in memory; only the kept documents are tokenized and packed.

    ``order``, from the curriculum layer (e.g. :class:`effitrain.curriculum.sharded_in_context.ShardedChains`):
    called as ``order(out, corpus, eval_docs, selected_or_None, data_params, work)`` it writes ``out/order.npy``,
    the train documents' ``(file, record)`` pairs in the order to pack them (one stream across domains, a row's
    domain that of the document it starts in), and ``out/info.json``; ``order.kind`` names the order in the
    shards' index, where the curriculum finds it.

    ``condition``, ``(field, prefix, suffix)`` from the curriculum's params (MeCo's metadata conditioning): the
    shards also hold the *conditioned* train rows -- every train document after the tokens of ``prefix +
    document[field] + suffix``, packed per domain as the plain rows -- with their loss mask (False on those header
    tokens), read with :meth:`TokenShards.conditioned`.

    ``knots``, ``(chunks_per_doc, knot_probability, preserve_partial_order, seed)`` from the curriculum's params
    (Untie the Knots): the train rows are the knotted rows of :func:`effitrain.data.knots.knotted_rows` over the
    train documents in pool order, with their loss mask (:meth:`TokenShards.row_mask`); the shards' ``order`` is
    ``untie_knots``."""
    from effitrain.data.engine import finish_stage
    from effitrain.data.shards import TokenShards, token_dtype
    from effitrain.data.tokenizer import build_tokenizer

    root = cache_root(cache_dir)
    bpe = getattr(model_params, "tokenizer", None) == "bpe"
    corpus, scanned, selected = scan_and_select(dataset_params, data_params, selection=selection, bpe=bpe,
                                                cache_dir=cache_dir)
    files = corpus.files
    sample = None
    if bpe:
        import datasets

        with open(scanned / "sample.jsonl", encoding="utf-8") as fh:
            sample = datasets.Dataset.from_dict({"text": [json.loads(line)["text"] for line in fh]})
    tokenizer = build_tokenizer(model_params, sample, cache_dir=cache_dir)
    from effitrain.data.packing import tokenizer_fingerprint

    seq_len = dataset_params.seq_len
    dtype = token_dtype(len(tokenizer))
    # dataset.packing=decompose (dataset decomposition): the train rows are power-of-two pieces of single documents
    decompose = (dataset_params.min_piece_len, getattr(dataset_params, "seed", 0)) \
        if getattr(dataset_params, "packing", "concatenate") == "decompose" else None
    if decompose and (order is not None or knots is not None):
        raise ConfigError(f"dataset.packing=decompose: the curriculum packs its own rows "
                          f"({order.kind if order is not None else 'untie_knots'}); drop one")
    ordered = None
    if order is not None:
        order_key = ContentHash("data_order", _VERSION, scanned.name,
                                selected.parent.name if selected is not None else "all", *order.key_parts()).hexdigest()
        done = build_once("data_order", order_key,
                          lambda out: order(out, corpus, scanned / "eval_docs.npy", selected, data_params,
                                            root / "data_engine" / f"{order_key}-{data_params.tasks}t"),
                          cache_root=root)
        order.info = json.loads((done / "info.json").read_text())
        ordered = done / "order.npy"
    shards_key = ContentHash("token_shards", _VERSION, scanned.name, tokenizer_fingerprint(tokenizer), seq_len,
                             dtype.name, selected.parent.name if selected is not None else "all",
                             *(("decompose", *decompose) if decompose else ()),
                             *(("order", ordered.parent.name) if ordered is not None else ()),
                             *(("condition", *condition) if condition is not None else ()),
                             *(("knots", *knots) if knots is not None else ())).hexdigest()

    def pack_into(out: Path) -> None:
        work = root / "data_engine" / f"{shards_key}-{data_params.tasks}t"
        _tokenize(work, corpus, data_params, tokenizer, scanned / "eval_docs.npy", dtype, selected,
                  lengths=decompose is not None or ordered is not None or knots is not None, condition=condition)
        start = time.perf_counter()
        _pack(out, work, len(files), seq_len, dtype, decompose, ordered=ordered,
              order_kind=None if order is None else order.kind,
              knotting=None if knots is None else _knot_settings(*knots, tokenizer=tokenizer))
        say(f"data: pack: done in {time.perf_counter() - start:.1f} s")
        finish_stage(work)  # the token streams: as big as the corpus's tokens

    shards = TokenShards(build_once("token_shards", shards_key, pack_into, cache_root=root))
    if len(shards) == 0 and decompose:
        raise ConfigError(f"dataset.min_piece_len: no bucket of the train split fills one row of {seq_len} tokens "
                          f"with pieces of at least {decompose[0]}; add documents or lower seq_len")
    if len(shards) == 0:
        raise ConfigError(f"dataset.seq_len: the train split has fewer than {seq_len} tokens in every domain; "
                          f"lower seq_len or add documents")
    if dataset_params.eval_path:
        eval_rows = _eval_from_files(dataset_params, tokenizer, cache_dir)
    else:
        eval_rows = shards.eval_by_domain()
        for domain in json.loads((scanned / "summary.json").read_text())["domains"]:
            if domain not in eval_rows:
                raise ConfigError(f"dataset.eval_examples_per_domain: the eval documents of domain '{domain}' make "
                                  f"less than one sequence of {seq_len} tokens; raise it or lower dataset.seq_len")
    return tokenizer, shards, eval_rows


class _Corpus:
    """The files and how to read them (what the reader step of every stage is built from)."""

    def __init__(self, files: Sequence[str], fmt: str, text_field: str, domain_field: Optional[str],
                 domains: Optional[Sequence[str]]) -> None:
        self.files, self.fmt, self.text_field, self.domain_field = list(files), fmt, text_field, domain_field
        self.domains = None if domains is None else list(domains)

    def reader(self, records_dir: Optional[Path] = None) -> Any:
        from effitrain.data.engine import CorpusReader

        return CorpusReader(self.files, self.fmt, text_field=self.text_field, domain_field=self.domain_field,
                            domains=self.domains, records_dir=None if records_dir is None else str(records_dir))


# ------------------------------------------------------------------------------------------------ scan + reduce
def _scan(out: Path, corpus: _Corpus, data_params: Any, work: Path, *, holdout: int, sample_docs: int) -> None:
    from effitrain.data.engine import DocumentIndex, finish_stage, run_stage

    run_stage(data_params, [corpus.reader(work / "records"), DocumentIndex(str(work), sample_docs=sample_docs,
                                                                           holdout=holdout)],
              work, job_name="scan")
    n_files = len(corpus.files)
    records = np.array([json.loads((work / "records" / f"{i:06d}.json").read_text())["records"]
                        for i in range(n_files)], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(records)[:-1]])
    counts: dict[str, int] = {}
    best: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # domain -> (rank, global position, file)
    for f in range(n_files):
        path = work / "index" / f"{f:06d}.npz"
        if not path.is_file():  # no document in this file (or none of dataset.domains)
            continue
        with np.load(path) as z:
            record, domain, has_id, ranks, names = (z["record"], z["domain"], z["has_id"], z["id_rank"],
                                                   z["domains"].tolist())
        ranks = ranks.copy()
        from effitrain.data.engine import id_rank

        for j in np.flatnonzero(~has_id):  # the in-memory builder's ids of records without one
            ranks[j] = id_rank(f"train-{int(offsets[f] + record[j]):09d}")
        for code, name in enumerate(names):
            mine = domain == code
            counts[name] = counts.get(name, 0) + int(mine.sum())
            if holdout:
                best[name] = _top_k((ranks[mine], offsets[f] + record[mine], np.full(int(mine.sum()), f)),
                                    best.get(name), holdout)
    if corpus.domains is not None:
        from effitrain.registry import choices_text, did_you_mean

        for d in corpus.domains:
            if d not in counts:
                raise ConfigError(f"dataset.domains: unknown domain '{d}'{did_you_mean(d, counts)}; "
                                  f"valid: {choices_text(counts)}")
    if not counts:
        raise ConfigError("dataset: the train split has no documents with text")
    eval_pairs = []
    for name in sorted(counts):
        if holdout and counts[name] <= holdout:
            raise ConfigError(f"dataset.eval_examples_per_domain: domain '{name}' has only {counts[name]} documents, "
                              f"not enough to hold out {holdout} for evaluation; lower it or give an eval split")
        if holdout:
            _, position, file_of = best[name]
            eval_pairs += [(int(fi), int(p - offsets[fi])) for fi, p in zip(file_of, position)]
    np.save(out / "eval_docs.npy", np.array(sorted(eval_pairs), dtype=np.int64).reshape(-1, 2))
    if sample_docs:
        _write_sample(out / "sample.jsonl", work / "sample", set(eval_pairs), sample_docs)
    (out / "summary.json").write_text(json.dumps({"domains": sorted(counts), "documents": counts,
                                                  "files": n_files}) + "\n")
    finish_stage(work)


def _top_k(new: tuple[np.ndarray, ...], old: Optional[tuple[np.ndarray, ...]], k: int) -> tuple[np.ndarray, ...]:
    """The ``k`` entries of lowest (rank, position) among ``new`` and ``old`` (arrays: rank, position, file)."""
    merged = new if old is None else tuple(np.concatenate([a, b]) for a, b in zip(old, new))
    order = np.lexsort((merged[1], merged[0]))[:k]
    return tuple(a[order] for a in merged)


def _write_sample(path: Path, candidates_dir: Path, eval_pairs: set, sample_docs: int) -> None:
    """The BPE sample: the ``sample_docs`` train documents of lowest sample rank among the tasks' candidates, written
    in corpus order (the in-memory path's :func:`effitrain.data.tokenizer.bpe_sample`)."""
    from effitrain.data.engine import lowest_candidates

    with open(path, "w", encoding="utf-8") as fh:
        for file_index, record, text in lowest_candidates(candidates_dir, sample_docs, eval_pairs):
            fh.write(json.dumps({"file": file_index, "record": record, "text": text}) + "\n")


# ------------------------------------------------------------------------------------------- tokenize + pack
def _tokenize(work: Path, corpus: _Corpus, data_params: Any, tokenizer: Any, eval_docs: Path,
              dtype: np.dtype, train_docs: Optional[Path] = None, *, lengths: bool = False,
              condition: Optional[tuple[str, str, str]] = None) -> None:
    from effitrain.data.engine import TokenStreams, run_stage

    tokenizer_dir = work / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        tmp = work / ".tokenizer.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tokenizer.save_pretrained(str(tmp))
        shutil.rmtree(tokenizer_dir, ignore_errors=True)
        os.rename(tmp, tokenizer_dir)
    run_stage(data_params, [corpus.reader(), TokenStreams(str(work), tokenizer_dir=str(tokenizer_dir),
                                                          eos_id=tokenizer.eos_token_id, eval_docs=str(eval_docs),
                                                          dtype=dtype.name,
                                                          train_docs=None if train_docs is None else str(train_docs),
                                                          lengths=lengths, condition=condition,
                                                          files=corpus.files if condition else ())],
              work, job_name="tokenize")


def _pack(out: Path, work: Path, n_files: int, seq_len: int, dtype: np.dtype,
          decompose: Optional[tuple[int, int]] = None, *, ordered: Optional[Path] = None,
          order_kind: Optional[str] = None, knotting: Optional[dict[str, Any]] = None) -> None:
    """Concatenate every domain's streams in file order and cut rows of ``seq_len`` into token shards; with
    ``decompose`` (``(min_piece_len, seed)``) the train rows are decomposed instead (:func:`_decomposed_pieces`);
    with ``ordered`` (an ``.npy`` of ``(file, record)`` pairs) they are packed in that order (:func:`_chained`);
    with ``knotting`` they are Untie the Knots' rows (:func:`_knot_to_scratch`)."""
    from effitrain.data.shards import ShardWriter

    metas: dict[int, dict] = {}
    for f in range(n_files):
        meta = work / "tokens" / f"{f:06d}" / "meta.json"
        if meta.is_file():
            metas[f] = json.loads(meta.read_text())
    domains = sorted({d for m in metas.values() for d in m["domains"]})
    totals = {split: {d: 0 for d in domains} for split in ("train", "eval", "cond")}
    for m in metas.values():
        for split in totals:
            for d, n in zip(m["domains"], m["tokens"].get(split, ())):
                totals[split][d] += n
    conditioned = any(m["tokens"].get("cond") is not None for m in metas.values())
    buckets = chain = knotted = None
    if knotting is not None:
        knotted = _knot_to_scratch(out / ".knotted", work, metas, domains, seq_len, dtype, knotting)
        train_rows, order_kind = knotted, "untie_knots"
    elif ordered is not None:
        chain = _chain_locations(work, metas, np.load(ordered))
        train_rows = int(chain[3].sum()) // seq_len
    elif decompose is None:
        train_rows = sum(n // seq_len for n in totals["train"].values())
    else:
        train_domains = [d for d in domains if totals["train"][d]]  # numbered as the in-memory path numbers them
        buckets = _decomposed_pieces(work, metas, train_domains, seq_len, *decompose)
        train_rows = sum(len(files) // (seq_len // length) for (_, length), (files, _) in buckets.items())
    writer = ShardWriter(out, seq_len=seq_len, dtype=dtype, domains=domains, rows=train_rows,
                         eval_rows=sum(n // seq_len for n in totals["eval"].values()),
                         piece_lengths=decompose is not None, order=order_kind,
                         conditioned_rows=sum(n // seq_len for n in totals["cond"].values()) if conditioned else None)
    if conditioned:
        _write_conditioned(writer, work, metas, domains, seq_len, dtype)
    for split in ("train", "eval"):
        if split == "train" and knotted is not None:
            _copy_knotted(writer, out / ".knotted", knotted, seq_len, dtype, domains)
            continue
        if split == "train" and chain is not None:
            _write_chained(writer, work, metas, chain, seq_len, dtype, domains)
            continue
        if split == "train" and buckets is not None:
            _write_decomposed(writer, work, metas, buckets, train_domains, seq_len, dtype, decompose[1])
            continue
        for d in domains:
            for rows, _ in _cut_rows(_domain_streams(work, metas, d, split), seq_len, dtype):
                writer.add(rows, d, split=split)
    writer.close()


def _knot_settings(chunks_per_doc: int, knot_probability: float, preserve_partial_order: bool, seed: int, *,
                   tokenizer: Any) -> dict[str, Any]:
    """Untie the Knots' settings for :func:`effitrain.data.knots.knotted_row_stream`, with the markers spelled by the
    run's tokenizer."""
    from effitrain.data.knots import Markers

    return dict(chunks_per_doc=chunks_per_doc, knot_probability=knot_probability,
                preserve_partial_order=preserve_partial_order, seed=seed, markers=Markers.of(tokenizer),
                pad_id=tokenizer.eos_token_id)


_KNOTTED_FILES = ("rows", "mask", "domain", "knotted")


def _knot_to_scratch(scratch: Path, work: Path, metas: dict[int, dict], domains: list[str], seq_len: int,
                     dtype: np.dtype, knotting: dict[str, Any]) -> int:
    """Untie the Knots' rows over the train documents in pool order ((file, record), as the in-memory documents),
    each document read from its token stream (``pread``) when its row is built; written to flat files in
    ``scratch`` (their number is known only at the end); returns the number of rows."""
    from effitrain.data.knots import knotted_row_stream

    per_file = [(f, *_file_locations(work, f, m)) for f, m in metas.items()]  # pool order: file, then record
    files = np.concatenate([np.zeros(0, np.int64)] + [np.full(len(rec), f, np.int64) for f, rec, *_ in per_file])
    ks, offsets, lengths = (np.concatenate([np.zeros(0, dt)] + [loc[i] for loc in per_file])
                            for i, dt in ((2, np.int32), (3, np.int64), (4, np.int64)))
    del per_file
    reads = _Preads()
    codes = {f: [domains.index(d) for d in m["domains"]] for f, m in metas.items()}

    def read(doc: int) -> np.ndarray:
        f, k = int(files[doc]), int(ks[doc])
        raw = reads.read(work / "tokens" / f"{f:06d}" / f"train-{k}.bin", int(lengths[doc]) * dtype.itemsize,
                         int(offsets[doc]) * dtype.itemsize)
        return np.frombuffer(raw, dtype=dtype).astype(np.int32)

    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    outs = {name: open(scratch / name, "wb") for name in _KNOTTED_FILES}
    count = 0
    try:
        for row in knotted_row_stream(lengths, read, seq_len, **knotting):
            first = max(row.first_doc, 0)
            outs["rows"].write(row.tokens.astype(dtype).tobytes())
            outs["mask"].write(row.mask.astype(np.uint8).tobytes())
            outs["domain"].write(np.uint16(codes[int(files[first])][int(ks[first])]).tobytes())
            outs["knotted"].write(np.uint8(row.knotted).tobytes())
            count += 1
    finally:
        reads.close()
        for fh in outs.values():
            fh.close()
    return count


def _copy_knotted(writer: Any, scratch: Path, count: int, seq_len: int, dtype: np.dtype,
                  domains: list[str]) -> None:
    """The knotted rows from ``scratch`` into the shards, a block at a time, with ``train-mask.npy`` and
    ``train-knotted.npy`` beside them."""
    from effitrain.data.shards import _NpyAppender

    block = max(1, _READ_BLOCK // seq_len)
    mask_out = _NpyAppender(writer.folder / "train-mask.npy", np.dtype(bool), (count, seq_len))
    with open(scratch / "rows", "rb") as rows, open(scratch / "mask", "rb") as masks, \
            open(scratch / "domain", "rb") as codes:
        for lo in range(0, count, block):
            n = min(block, count - lo)
            part = np.fromfile(rows, dtype=dtype, count=n * seq_len).reshape(n, seq_len)
            writer.add(part, np.asarray(domains, dtype=object)[np.fromfile(codes, np.uint16, count=n)])
            mask_out.write(np.fromfile(masks, np.uint8, count=n * seq_len).astype(bool))
    mask_out.close()
    np.save(writer.folder / "train-knotted.npy", np.fromfile(scratch / "knotted", np.uint8).astype(bool))
    shutil.rmtree(scratch, ignore_errors=True)


def _domain_streams(work: Path, metas: dict[int, dict], domain: str, name: str) -> Iterator[Path]:
    """The non-empty ``<name>-<k>.bin`` token streams of ``domain``, in file order."""
    for f, m in metas.items():
        if domain in m["domains"]:
            path = work / "tokens" / f"{f:06d}" / f"{name}-{m['domains'].index(domain)}.bin"
            if path.is_file() and path.stat().st_size:
                yield path


def _cut_rows(streams: Iterable[Path], seq_len: int, dtype: np.dtype,
              masked: bool = False) -> Iterator[tuple[np.ndarray, Optional[np.ndarray]]]:
    """``(rows, mask)``: the streams concatenated and cut into rows of ``seq_len`` (the incomplete tail dropped),
    with ``masked`` the loss mask of each stream's ``.msk`` beside it (else None).  Read in blocks, not through a
    memory map: a map's pages stay resident while it is open, and a file's stream grows with the corpus."""
    carry, carry_mask = np.zeros(0, dtype=dtype), np.zeros(0, dtype=bool)
    for path in streams:
        with open(path, "rb") as tokens, (open(path.with_suffix(".msk"), "rb") if masked else nullcontext()) as masks:
            while True:
                part = np.fromfile(tokens, dtype=dtype, count=_READ_BLOCK)
                if not len(part):
                    break
                block = np.concatenate([carry, part])
                n = len(block) // seq_len
                if masked:
                    block_mask = np.concatenate([carry_mask, np.fromfile(masks, dtype=np.uint8,
                                                                         count=len(part)).astype(bool)])
                    carry_mask = block_mask[n * seq_len:].copy()
                if n:
                    yield (block[:n * seq_len].reshape(n, seq_len),
                           block_mask[:n * seq_len].reshape(n, seq_len) if masked else None)
                carry = block[n * seq_len:].copy()


def _write_conditioned(writer: Any, work: Path, metas: dict[int, dict], domains: list[str], seq_len: int,
                       dtype: np.dtype) -> None:
    """The conditioned train rows: every domain's ``cond`` streams (header, document, EOS) in file order, cut into
    rows of ``seq_len`` with their loss mask, as :func:`effitrain.curriculum.meco.conditioned_rows` packs them in
    memory (domains sorted, the tail of each domain dropped)."""
    for d in domains:
        for rows, mask in _cut_rows(_domain_streams(work, metas, d, "cond"), seq_len, dtype, masked=True):
            writer.add_conditioned(rows, mask, d)


def _decomposed_pieces(work: Path, metas: dict[int, dict], domains: list[str], seq_len: int, min_len: int,
                       seed: int) -> dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]:
    """Dataset decomposition's cut of every train document, exactly :func:`effitrain.data.decompose.pack_decomposed`'s:
    the ``i``-th document of domain number ``d_index`` (pool order: files in order, records in order) is cut with
    ``default_rng([seed, d_index, i])``.  Returns ``{(domain, piece length): (file of each piece, its offset in
    the file's train stream of that domain)}``, domains sorted, lengths ascending -- 12 bytes a piece, no tokens."""
    from array import array

    from effitrain.data.decompose import decompose

    out: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
    for d_index, d in enumerate(domains):
        pieces: dict[int, tuple[array, array]] = {}
        i = 0
        for f, m in metas.items():
            path = work / "tokens" / f"{f:06d}" / f"train-{m['domains'].index(d)}.len" if d in m["domains"] else None
            if path is None or not path.is_file():
                continue
            lengths = np.fromfile(path, dtype=np.uint32)
            starts = np.concatenate([[0], np.cumsum(lengths[:-1], dtype=np.int64)]) if len(lengths) else lengths
            for n, offset in zip(lengths.tolist(), starts.tolist()):
                rng = np.random.default_rng([seed % 2**63, d_index, i])
                for length in decompose(n, min_len=min_len, max_len=seq_len, rng=rng):
                    files, offsets = pieces.setdefault(length, (array("i"), array("q")))
                    files.append(f)
                    offsets.append(offset)
                    offset += length
                i += 1
        for length in sorted(pieces):
            files, offsets = pieces[length]
            out[(d, length)] = (np.frombuffer(files, dtype=np.int32), np.frombuffer(offsets, dtype=np.int64))
    return out


class _Preads:
    """``pread`` from many files with at most ``limit`` of them open (least recently used closed first): a corpus of
    thousands of files has more token streams than a process may hold descriptors (``ulimit -n``: often 1,024)."""

    def __init__(self, limit: int = 256) -> None:
        from collections import OrderedDict

        self.limit, self.open = limit, OrderedDict()

    def read(self, path: Path, size: int, offset: int) -> bytes:
        fd = self.open.pop(path, None)
        if fd is None:
            if len(self.open) >= self.limit:
                os.close(self.open.popitem(last=False)[1])
            fd = os.open(path, os.O_RDONLY)
        self.open[path] = fd  # most recently used last
        return os.pread(fd, size, offset)

    def close(self) -> None:
        for fd in self.open.values():
            os.close(fd)
        self.open.clear()


def _write_decomposed(writer: Any, work: Path, metas: dict[int, dict], buckets: dict, domains: list[str],
                      seq_len: int, dtype: np.dtype, seed: int) -> None:
    """Each bucket's pieces in the in-memory path's order (a seeded permutation per domain and length), ``seq_len /
    length`` of them side by side in a row, the incomplete last row dropped; pieces are read with ``pread`` from
    the token streams (random access, no map kept resident), a block of rows at a time."""
    d_index = {d: k for k, d in enumerate(domains)}  # every train domain, pieces or not
    reads = _Preads()
    try:
        for (d, length), (files, offsets) in buckets.items():
            per_row = seq_len // length
            order = np.random.default_rng([seed % 2**63, d_index[d], length]).permutation(len(files))
            n = len(files) // per_row
            rows_per_block = max(1, _READ_BLOCK // seq_len)
            for first in range(0, n, rows_per_block):
                chosen = order[first * per_row:min(n, first + rows_per_block) * per_row]
                block = np.empty(len(chosen) * length, dtype=dtype)
                for k, j in enumerate(chosen.tolist()):
                    f = int(files[j])
                    path = work / "tokens" / f"{f:06d}" / f"train-{metas[f]['domains'].index(d)}.bin"
                    raw = reads.read(path, length * dtype.itemsize, int(offsets[j]) * dtype.itemsize)
                    block[k * length:(k + 1) * length] = np.frombuffer(raw, dtype=dtype)
                writer.add(block.reshape(-1, seq_len), d, piece_len=length)
    finally:
        reads.close()


def _file_locations(work: Path, f: int, m: dict) -> tuple[np.ndarray, ...]:
    """File ``f``'s train documents sorted by record: ``(record, domain code into the file's own domains, token
    offset in that stream, length with its EOS)``, from the tokenize stage's ``train-<k>.rec`` and ``.len``."""
    recs, ks, offs, lens = [np.zeros(0, np.int64)], [np.zeros(0, np.int32)], [np.zeros(0, np.int64)], \
        [np.zeros(0, np.int64)]
    for k in range(len(m["domains"])):
        rec_path = work / "tokens" / f"{f:06d}" / f"train-{k}.rec"
        if not rec_path.is_file():
            continue
        length = np.fromfile(rec_path.with_suffix(".len"), np.uint32).astype(np.int64)
        recs.append(np.fromfile(rec_path, np.uint32).astype(np.int64))
        ks.append(np.full(len(length), k, np.int32))
        offs.append(np.concatenate([[0], np.cumsum(length[:-1])]).astype(np.int64))
        lens.append(length)
    rec, k_of, off, ln = (np.concatenate(a) for a in (recs, ks, offs, lens))
    by_rec = np.argsort(rec, kind="stable")
    return rec[by_rec], k_of[by_rec], off[by_rec], ln[by_rec]


def _chain_locations(work: Path, metas: dict[int, dict], pairs: np.ndarray) -> tuple[np.ndarray, ...]:
    """Where each ``(file, record)`` of ``pairs`` lies in the token streams: ``(file, domain name code into the
    file's own domains, token offset in that stream, length with its EOS)``, in the order of ``pairs`` (about 24
    bytes a document)."""
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    n = len(pairs)
    out_file, out_k = pairs[:, 0].copy(), np.full(n, -1, np.int32)
    out_offset, out_len = np.zeros(n, np.int64), np.zeros(n, np.int64)
    for f in np.unique(out_file).tolist():
        m = metas.get(f)
        mine = np.flatnonzero(out_file == f)
        if m is None:
            raise RuntimeError(f"token streams: file {f} of the order has no streams")
        rec, k_of, off, ln = _file_locations(work, f, m)
        at = np.searchsorted(rec, pairs[mine, 1])
        if (at >= len(rec)).any() or (rec[np.minimum(at, len(rec) - 1)] != pairs[mine, 1]).any():
            raise RuntimeError(f"token streams: a document of the order is missing from file {f}'s train streams")
        out_k[mine], out_offset[mine], out_len[mine] = k_of[at], off[at], ln[at]
    return out_file, out_k, out_offset, out_len


def _write_chained(writer: Any, work: Path, metas: dict[int, dict], chain: tuple[np.ndarray, ...], seq_len: int,
                   dtype: np.dtype, domains: list[str]) -> None:
    """The documents in chain order as one stream (each with its EOS), cut into rows of ``seq_len``, the last
    partial row dropped; a row's domain is that of the document its first token belongs to
    (:func:`effitrain.data.repack.pack_stream`).  Documents are read with ``pread``, a block at a time."""
    files, ks, offsets, lengths = chain
    names = {f: m["domains"] for f, m in metas.items()}
    reads = _Preads()
    carry = np.zeros(0, dtype=dtype)
    carry_starts = np.zeros(0, np.int64)  # token positions (in carry) where its documents start
    carry_domains: list[str] = []
    block_docs = max(1, _READ_BLOCK // max(1, seq_len))
    try:
        for lo in range(0, len(files), block_docs):
            parts, starts, doc_domains = [carry], [carry_starts], list(carry_domains)
            position = len(carry)
            new_starts = []
            for f, k, off, ln in zip(files[lo:lo + block_docs].tolist(), ks[lo:lo + block_docs].tolist(),
                                     offsets[lo:lo + block_docs].tolist(), lengths[lo:lo + block_docs].tolist()):
                raw = reads.read(work / "tokens" / f"{f:06d}" / f"train-{k}.bin", ln * dtype.itemsize,
                                 off * dtype.itemsize)
                parts.append(np.frombuffer(raw, dtype=dtype))
                new_starts.append(position)
                doc_domains.append(names[f][k])
                position += ln
            block = np.concatenate(parts)
            doc_starts = np.concatenate([*starts, np.asarray(new_starts, np.int64)])
            n = len(block) // seq_len
            if n:
                first = np.searchsorted(doc_starts, np.arange(n, dtype=np.int64) * seq_len, side="right") - 1
                writer.add(block[:n * seq_len].reshape(n, seq_len), np.asarray(doc_domains, dtype=object)[first])
            # what is left: the tail, and the documents that reach into it (the first may start before it)
            cut = n * seq_len
            keep_from = max(0, int(np.searchsorted(doc_starts, cut, side="right")) - 1)
            carry = block[cut:].copy()
            carry_starts = doc_starts[keep_from:] - cut
            carry_domains = doc_domains[keep_from:]
    finally:
        reads.close()


def _eval_from_files(dataset_params: Any, tokenizer: Any, cache_dir: Optional[str | Path]) -> dict[str, np.ndarray]:
    """``dataset.eval_path``'s documents packed in this process (an eval split is small)."""
    from effitrain.data.build import _load_files
    from effitrain.data.packing import pack, to_numpy
    from effitrain.data.sources import cap_per_domain, domain_indices, filter_domains, resolve_files, standardize

    files = resolve_files(dataset_params.eval_path, "dataset.eval_path")
    fmt, ds = _load_files(files, "dataset.eval_path", cache_dir, text_field=dataset_params.text_field,
                          domain_field=dataset_params.domain_field, txt_split=dataset_params.txt_split)
    ds = standardize(ds, text_field="text" if fmt == "text" else dataset_params.text_field,
                     domain_field=None if fmt == "text" else dataset_params.domain_field, key="dataset",
                     id_prefix="eval")
    ds = cap_per_domain(filter_domains(ds, dataset_params.domains, "dataset", strict=False),
                        dataset_params.eval_examples_per_domain)
    packed = pack(ds, tokenizer, dataset_params.seq_len, cache_dir=cache_dir)
    rows = domain_indices(packed)
    out = {}
    for domain in sorted(domain_indices(ds)):
        if domain not in rows:
            raise ConfigError(f"dataset.eval_examples_per_domain: the eval documents of domain '{domain}' make less "
                              f"than one sequence of {dataset_params.seq_len} tokens; raise it or lower "
                              f"dataset.seq_len")
        out[domain] = np.asarray(to_numpy(packed.select(rows[domain])))
    return out


def shards_info(shards: Any, data_params: Any, selection_info: Optional[dict] = None) -> dict[str, Any]:
    """The run summary's ``selection`` entry for the sharded path: the selection's own figures (``none``: every
    train document) and the token shards."""
    from effitrain.data.shards import code_counts

    per_code = code_counts(shards.domain_codes(), len(shards.domain_names))
    counts = {str(d): int(n) for d, n in zip(shards.domain_names, per_code) if n}
    return {"method": "none", "engine": f"datatrove {data_params.executor}, {data_params.tasks} tasks",
            "token_shards": str(shards.folder), "kept_rows": len(shards), "kept_domains": counts,
            "kept_token_fraction": 1.0, **(selection_info or {})}
