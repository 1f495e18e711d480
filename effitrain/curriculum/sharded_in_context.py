"""In-context pre-training's chains on the sharded corpus (issue 24, ``curriculum=in_context`` with
``data.executor``): map, reduce, map, reduce -- the chain order of :mod:`effitrain.curriculum.in_context` on the same
train documents, without the corpus in one process.

1. **statistics** (datatrove tasks): per file, the document frequencies of its train documents' hashed n-grams
   (the non-zero entries only) and its candidates for the SVD's fitting sample (the ``_FIT_DOCS`` lowest text
   hashes, with their texts).
2. **embedding fit** (reduce, this process): the idf of the summed frequencies, and the truncated SVD fitted on the
   merged sample -- the in-memory path's sample and fit, exactly.
3. **embed** (datatrove tasks): per file, every train document's embedding (raw ``float32``, ``embed_dims`` a
   document), its record number and its first 100 characters (for the near-duplicate filter).
4. **chain** (reduce, this process): the FAISS index fed file by file from memory maps (an ``IVF,PQ`` index holds
   ``embed_dims / 4`` bytes a document, not the vectors), the kNN search in blocks, the traversal on the CSR graph
   (8 bytes an edge) and the filter reading prefixes from disk; out comes ``order.npy``, the ``(file, record)``
   pairs in chain order.  The data engine then packs the token streams in that order
   (:func:`effitrain.data.sharded.build_sharded_splits`).

What grows with the corpus is the reduce's arrays: the index's codes, the kNN lists and the CSR graph -- about
``embed_dims / 4 + 8`` bytes a document of index, ``8 * neighbors`` of kNN lists and up to ``16 * neighbors`` of
graph (about 260 bytes with the defaults, and about 360 more while the graph is sorted; 1,191 MB peak at 1M
documents, docs/benchmarks.md), never the texts or the vectors.  The authors' own search of 635M documents was a sharded FAISS job (``offline_ivf``); a
corpus of that size needs it too.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from effitrain.console import say
from effitrain.curriculum.in_context import (_FIT_DOCS, _SEARCH_BATCH, _VERSION, Embedding, chain_order,
                                             chain_settings, document_frequencies, hashed_counts, idf, text_rank,
                                             tfidf)
from effitrain.data.engine import (PipelineStep, _per_file, batched, document_keys, finish_stage, lowest_candidates,
                                   offer_candidate, records_of, run_stage, write_candidates)

_BATCH = 1000  # documents hashed and embedded at a time in a task


def _train_docs(docs: Iterator[Any], file_index: int, eval_keys: np.ndarray, keep_keys: Optional[np.ndarray]):
    """The file's train documents: not held out for evaluation and, after a selection, kept by it."""
    held = records_of(eval_keys, file_index)
    keep = None if keep_keys is None else records_of(keep_keys, file_index)
    return (d for d in docs if d.metadata["record"] not in held and (keep is None or d.metadata["record"] in keep))


class _Step(PipelineStep):
    def __init__(self, out_dir: str, *, settings: dict, eval_docs: str, train_docs: Optional[str]) -> None:
        super().__init__()
        self.out_dir, self.settings, self.eval_docs, self.train_docs = out_dir, settings, eval_docs, train_docs

    def _files(self, data: Any) -> Iterator[tuple[int, Iterator[Any]]]:
        eval_keys = document_keys(self.eval_docs)
        keep_keys = None if self.train_docs is None else document_keys(self.train_docs)
        for file_index, docs in _per_file(data):
            yield file_index, _train_docs(docs, file_index, eval_keys, keep_keys)


class ChainStatistics(_Step):
    """Per file ``stats/NNNNNN.npz``: ``features`` and ``df`` (its documents' frequencies of the hashed n-grams
    that occur), ``documents``; and ``sample/NNNNNN.jsonl``, its ``_FIT_DOCS`` lowest text hashes, sorted."""

    name = "effitrain in-context statistics"
    type = "🔢 - FEATURES"

    def run(self, data: Any = None, rank: int = 0, world_size: int = 1) -> Iterator[Any]:
        n_features = self.settings["n_features"]
        (Path(self.out_dir) / "stats").mkdir(parents=True, exist_ok=True)
        for file_index, docs in self._files(data):
            df = np.zeros(n_features, np.int64)
            best: list = []  # the file's best candidates for the fitting sample
            n = 0
            for batch in batched(docs, _BATCH):
                texts = [d.text for d in batch]
                df += document_frequencies(hashed_counts(texts, n_features))
                n += len(batch)
                for d, text in zip(batch, texts):
                    offer_candidate(best, text_rank(text), file_index, d.metadata["record"], text, _FIT_DOCS)
            nz = np.flatnonzero(df)
            stem = f"{file_index:06d}"
            tmp = Path(self.out_dir) / "stats" / f".{stem}.tmp{os.getpid()}.npz"
            np.savez(tmp, features=nz.astype(np.int64), df=df[nz], documents=np.int64(n))
            write_candidates(Path(self.out_dir) / "sample" / f"{stem}.jsonl", best)
            os.replace(tmp, Path(self.out_dir) / "stats" / f"{stem}.npz")  # last: the file's statistics are whole
            self.stat_update("files")
        return iter(())


class ChainEmbeddings(_Step):
    """Per file ``embed/NNNNNN/``: ``vectors.f32`` (``embed_dims`` float32 a document), ``records.u32`` and the
    first 100 characters of each document (``prefix.bin``, UTF-8, cut at ``prefix.u64``'s offsets)."""

    name = "effitrain in-context embeddings"
    type = "🔢 - FEATURES"

    def __init__(self, out_dir: str, *, fit: str, **kwargs: Any) -> None:
        super().__init__(out_dir, **kwargs)
        self.fit = fit

    def run(self, data: Any = None, rank: int = 0, world_size: int = 1) -> Iterator[Any]:
        from effitrain.data.engine import _atomic_dir, _publish

        with np.load(Path(self.fit) / "idf.npz") as z:
            idf_values = z["idf"]
        embedding = Embedding.load(Path(self.fit) / "embedding.npz")
        for file_index, docs in self._files(data):
            final = Path(self.out_dir) / "embed" / f"{file_index:06d}"
            tmp = _atomic_dir(final)
            offset = 0
            with open(tmp / "vectors.f32", "wb") as vectors, open(tmp / "records.u32", "wb") as records, \
                    open(tmp / "prefix.bin", "wb") as prefixes, open(tmp / "prefix.u64", "wb") as offsets:
                offsets.write(np.zeros(1, np.uint64).tobytes())
                for batch in batched(docs, _BATCH):
                    texts = [d.text for d in batch]
                    features = tfidf(hashed_counts(texts, self.settings["n_features"]), idf_values)
                    vectors.write(embedding.embed(features).tobytes())
                    records.write(np.array([d.metadata["record"] for d in batch], np.uint32).tobytes())
                    heads = [t[:100].encode("utf-8") for t in texts]
                    prefixes.write(b"".join(heads))
                    ends = offset + np.cumsum([len(h) for h in heads], dtype=np.int64)
                    offsets.write(ends.astype(np.uint64).tobytes())
                    offset = int(ends[-1])
            _publish(tmp, final)
            self.stat_update("files")
        return iter(())


class _Prefixes:
    """``prefixes[i]``: the first 100 characters of document ``i`` of the concatenated files.  The files' prefix
    blobs are copied into one (``prefixes.bin``, with 8 bytes a document of offsets), so one memory map serves every
    file -- a map per file would hold a descriptor per file, and a corpus may have more files than a process may
    open."""

    def __init__(self, folders: list[Path], out: Path) -> None:
        import shutil

        ends, base = [np.zeros(1, np.int64)], 0
        with open(out, "wb") as blob:
            for f in folders:
                with open(f / "prefix.bin", "rb") as part:
                    shutil.copyfileobj(part, blob)
                offsets = np.fromfile(f / "prefix.u64", np.uint64).astype(np.int64)
                ends.append(offsets[1:] + base)
                base += int(offsets[-1])
        self.offsets = np.concatenate(ends)
        self.blob = np.memmap(out, np.uint8, mode="r") if base else np.zeros(0, np.uint8)

    def __getitem__(self, i: int) -> str:
        return bytes(self.blob[self.offsets[i]:self.offsets[i + 1]]).decode("utf-8")


class ShardedChains:
    """The ``order`` hook of :func:`effitrain.data.sharded.build_sharded_splits` for ``curriculum=in_context``:
    called with the corpus, the scan's eval documents, the selection's kept documents (or None) and the engine
    settings, it writes ``out/order.npy`` (the ``(file, record)`` pairs in chain order) and ``out/info.json``."""

    kind = "in_context"

    def __init__(self, params: Any) -> None:
        self.settings = chain_settings(params)
        self.info: Optional[dict] = None

    def key_parts(self) -> tuple:
        return ("in_context", _VERSION, json.dumps(self.settings, sort_keys=True))

    def __call__(self, out: Path, corpus: Any, eval_docs: Path, train_docs: Optional[Path], data_params: Any,
                 work: Path) -> None:
        s = self.settings
        common = {"settings": s, "eval_docs": str(eval_docs),
                  "train_docs": None if train_docs is None else str(train_docs)}
        start = time.perf_counter()
        run_stage(data_params, [corpus.reader(), ChainStatistics(str(work), **common)], work / "stats_stage",
                  job_name="icp-stats")
        fit = work / "fit"
        if not (fit / "embedding.npz").is_file():
            fit_start = time.perf_counter()
            say(f"data: in-context: fitting the embedding (a truncated SVD of at most {_FIT_DOCS:,} documents) ...")
            self._fit(work, fit, len(corpus.files))
            say(f"data: in-context: embedding fitted in {time.perf_counter() - fit_start:.1f} s")
        run_stage(data_params, [corpus.reader(), ChainEmbeddings(str(work), fit=str(fit), **common)],
                  work / "embed_stage", job_name="icp-embed")
        say(f"data: in-context: embedded in {time.perf_counter() - start:.1f} s; searching the neighbours ...")
        start = time.perf_counter()
        folders = [work / "embed" / f"{f:06d}" for f in range(len(corpus.files))]
        folders = [f for f in folders if f.is_dir()]
        counts = np.array([(f / "records.u32").stat().st_size // 4 for f in folders], np.int64)
        dims = Embedding.load(fit / "embedding.npz").dims
        n = int(counts.sum())

        def embeddings() -> Iterator[np.ndarray]:
            """Blocks of ``_SEARCH_BATCH`` documents across the files' boundaries: the in-memory path's blocks, so
            FAISS computes every similarity the same way (a BLAS product's rounding depends on its shapes)."""
            pending: list[np.ndarray] = []
            held = 0
            for folder, count in zip(folders, counts.tolist()):
                if not count:
                    continue
                vectors = np.memmap(folder / "vectors.f32", np.float32, mode="r", shape=(count, dims))
                lo = 0
                while lo < count:
                    take = min(count - lo, _SEARCH_BATCH - held)
                    pending.append(np.array(vectors[lo:lo + take]))
                    held += take
                    lo += take
                    if held == _SEARCH_BATCH:
                        yield np.concatenate(pending)
                        pending, held = [], 0
                del vectors
            if held:
                yield np.concatenate(pending)

        kept, path_of, spec = chain_order(embeddings, n, dims, _Prefixes(folders, work / "prefixes.bin"),
                                          neighbors=s["neighbors"], index=s["index"], nprobe=s["nprobe"],
                                          dedup_threshold=s["dedup_threshold"])
        file_of = np.repeat([int(f.name) for f in folders], counts).astype(np.int64)
        record_of = np.concatenate([np.fromfile(f / "records.u32", np.uint32) for f in folders]).astype(np.int64) \
            if folders else np.zeros(0, np.int64)
        np.save(out / "order.npy", np.stack([file_of[kept], record_of[kept]], axis=1).reshape(-1, 2))
        self.info = {"documents": n, "kept_documents": int(len(kept)), "chains": int(path_of.max() + 1) if n else 0,
                     "index": spec, "embed_dims": dims, "seconds_chain": round(time.perf_counter() - start, 1)}
        (out / "info.json").write_text(json.dumps(self.info) + "\n")
        say(f"data: in-context: {n:,} documents in {self.info['chains']:,} chains ({spec} index), "
            f"{len(kept):,} kept after the near-duplicate filter, in {self.info['seconds_chain']} s")
        finish_stage(work)

    def _fit(self, work: Path, fit: Path, n_files: int) -> None:
        """The idf of the summed frequencies and the SVD fitted on the merged sample (written atomically)."""
        n_features = self.settings["n_features"]
        df = np.zeros(n_features, np.int64)
        n = 0
        for f in range(n_files):
            path = work / "stats" / f"{f:06d}.npz"
            if path.is_file():
                with np.load(path) as z:
                    df[z["features"]] += z["df"]
                    n += int(z["documents"])

        chosen = lowest_candidates(work / "sample", _FIT_DOCS)  # in pool order, as the in-memory sample
        idf_values = idf(df, n)
        sample = tfidf(hashed_counts([t for _, _, t in chosen], n_features), idf_values)
        embedding = Embedding.fit(sample, self.settings["embed_dims"])
        tmp = work / ".fit.tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        np.savez(tmp / "idf.npz", idf=idf_values)
        embedding.save(tmp / "embedding.npz")
        os.replace(tmp, fit)
