"""DSIR selection on the sharded data engine (issue 24, ``data.executor``): map, reduce, map, reduce -- exactly the
documents, in the same order, that the in-memory :class:`~effitrain.selection.scorers.dsir.DSIRScorer` and the
``gumbel_topk`` selector choose from ``dataset=local`` (:func:`effitrain.selection.pipeline.build_scored`).

1. **count** (datatrove tasks): per file, every train document's record number, domain, word/punctuation length
   (``min_length``) and budget weight (pre-tokenizer pieces), its hashed n-gram bucket ids (kept on disk, so every
   n-gram is hashed once) and the file's bucket counts.
2. **distributions** (reduce, this process): the target -- ``target.domain`` drawn from the train documents as
   :func:`~effitrain.selection.target.resolve_target` draws it (the same seeded permutation; its few texts are read
   back from their files: :func:`~effitrain.selection.sharded_pool.draw_target`, shared with the other sharded
   selections), or ``target.path`` / ``.dataset`` loaded as in memory; the pool counts are the files'
   counts summed minus the target's (integers: exact); then the log importance weights, the budget and each
   file's offset among the documents allowed past ``min_length``.
3. **score** (datatrove tasks, reading the count stage's bucket ids, not the corpus): per document its log
   importance weight (the scorer's own
   :func:`~effitrain.selection.scorers.dsir.document_scores`) and its Gumbel key; each task keeps only its best keys
   up to the budget (no document past a task's own budget can be in the global top).
4. **merge** (reduce): the tasks' candidates sorted by key and cut at the budget -- the global top-k.

The Gumbel keys are the in-memory selector's own: it draws ``rng.gumbel(size=n)`` from ``default_rng(seed)`` for
the ``n`` allowed documents in pool order, one 64-bit draw each, so the key of the allowed document number ``j`` is
the draw after ``PCG64(seed).advance(j)``.  Reproducing that stream (rather than seeding a key per document) keeps the
in-memory selection -- and every manifest and figure made with it -- unchanged, and the keys still do not depend on
how the files are split into tasks: ``j`` is a global position, known after the count reduce.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from effitrain.data.engine import PipelineStep, _per_file, finish_stage, run_stage
from effitrain.registry import ConfigError
from effitrain.selection.sharded_pool import domain_rows, draw_target, require_whole_pool_selector
from effitrain.selection.base import count_tokens
from effitrain.selection.scorers.dsir import document_scores, hashed_ngrams, log_importance, wordpunct

_VERSION = 2  # 2: the bucket ids in a raw file beside each counts/*.npz


def _features(text: str, p: Any) -> tuple[list[int], int]:
    lowered = text.lower() if p["lowercase"] else text
    return hashed_ngrams(text, p["num_buckets"], p["ngram"], p["lowercase"]), len(wordpunct(lowered))


def _save(path: Path, **arrays: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


class DsirCounts(PipelineStep):
    """Per file ``counts/NNNNNN.npz``: ``record``, ``domain`` (codes into ``domains``), ``length``, ``weight`` and
    ``offsets`` of its train documents (the eval hold-out skipped) and ``counts``, the bucket counts of their
    n-grams; and ``counts/NNNNNN.values``, the documents' bucket ids one after the other (raw ``uint16``, or
    ``uint32`` above 65 536 buckets), written as they are hashed, so a task holds one block of ids, not a file's."""

    name = "effitrain dsir counts"
    type = "🔢 - FEATURES"

    def __init__(self, out_dir: str, *, scorer: dict, eval_docs: str) -> None:
        super().__init__()
        self.out_dir, self.scorer, self.eval_docs = out_dir, scorer, eval_docs

    def run(self, data: Any = None, rank: int = 0, world_size: int = 1) -> Iterator[Any]:
        from effitrain.data.engine import domain_codes

        eval_set = set(map(tuple, np.load(self.eval_docs).tolist()))
        nb = self.scorer["num_buckets"]
        folder = Path(self.out_dir) / "counts"
        folder.mkdir(parents=True, exist_ok=True)
        for file_index, docs in _per_file(data):
            record, domains, lengths, weights, sizes = [], [], [], [], []
            counts = np.zeros(nb, dtype=np.int64)
            block: list[int] = []
            values_tmp = folder / f".{file_index:06d}.tmp{os.getpid()}.values"
            with open(values_tmp, "wb") as values:
                for d in docs:
                    if (file_index, d.metadata["record"]) in eval_set:
                        continue
                    ids, length = _features(d.text, self.scorer)
                    record.append(d.metadata["record"])
                    domains.append(d.metadata["domain"])
                    lengths.append(length)
                    weights.append(count_tokens(d.text))
                    sizes.append(len(ids))
                    block += ids
                    if len(block) >= _BLOCK:
                        counts += _flush(block, values, nb)
                        block = []
                counts += _flush(block, values, nb)
            # the bucket ids stay on disk for the keys stage (2 bytes an n-gram with <= 65 536 buckets): hashing
            # is the cost of DSIR, and this way every n-gram is hashed once, as in memory
            os.replace(values_tmp, folder / f"{file_index:06d}.values")
            names, codes = domain_codes(domains)
            _save(folder / f"{file_index:06d}.npz", offsets=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
                  record=np.array(record, dtype=np.int64), domain=codes, domains=names,
                  length=np.array(lengths, dtype=np.int64), weight=np.array(weights, dtype=np.int64), counts=counts)
            self.stat_update("files")
        return iter(())


_BLOCK = 1 << 22  # bucket ids hashed before they are counted and written (32 MiB as a list of ints)


def _ids_dtype(num_buckets: int) -> np.dtype:
    return np.dtype(np.uint16 if num_buckets <= 1 << 16 else np.uint32)


def _flush(block: list[int], out: Any, num_buckets: int) -> np.ndarray:
    ids = np.asarray(block, dtype=np.int64)
    out.write(ids.astype(_ids_dtype(num_buckets)).tobytes())
    return np.bincount(ids, minlength=num_buckets)


def _file_scores(log_w: np.ndarray, values_path: Path, offsets: np.ndarray, num_buckets: int,
                 length_normalize: bool) -> np.ndarray:
    """Every document's score of one file, reading its bucket ids a block of documents at a time.  Each document is
    scored on its own by :func:`document_scores`, so the blocks give the same bits as the whole file at once."""
    dtype = _ids_dtype(num_buckets)
    n = len(offsets) - 1
    scores = np.zeros(n)
    first = 0
    with open(values_path, "rb") as fh:
        while first < n:
            # as many whole documents as fit in a block (at least one)
            last = max(first + 1, int(np.searchsorted(offsets, offsets[first] + _BLOCK, side="right")) - 1)
            last = min(last, n)
            fh.seek(int(offsets[first]) * dtype.itemsize)
            values = np.fromfile(fh, dtype=dtype, count=int(offsets[last] - offsets[first])).astype(np.int64)
            scores[first:last] = document_scores(log_w, values, offsets[first:last + 1] - offsets[first],
                                                 length_normalize)
            first = last
    return scores


class DsirKeys(PipelineStep):
    """Per task ``keys/NNNNN.npz``: its allowed documents' ``key`` (score / T + Gumbel), ``order`` (global position
    among the allowed documents), ``weight``, ``file`` and ``record``, only the best keys up to the budget."""

    name = "effitrain dsir keys"
    type = "🎯 - SELECTION"

    def __init__(self, out_dir: str, *, scorer: dict, plan: str) -> None:
        super().__init__()
        self.out_dir, self.scorer, self.plan = out_dir, scorer, plan

    def run(self, data: Any = None, rank: int = 0, world_size: int = 1) -> Iterator[Any]:
        from effitrain.data.engine import task_files
        from effitrain.selection.selectors import take_until

        out = Path(self.out_dir)
        plan = json.loads(Path(self.plan).read_text())
        log_w = np.load(out / "log_w.npy")
        parts: dict[str, list] = {k: [] for k in ("key", "order", "weight", "file_index", "record")}
        for file_index in task_files(plan["n_files"], rank, world_size):  # the count stage's files, no re-reading
            entry = plan["files"].get(str(file_index))
            if entry is None:  # no train document in this file
                continue
            with np.load(out / "counts" / f"{file_index:06d}.npz") as z:
                offsets, record, length, weight = z["offsets"], z["record"], z["length"], z["weight"]
            scores = _file_scores(log_w, out / "counts" / f"{file_index:06d}.values", offsets,
                                  self.scorer["num_buckets"], self.scorer["length_normalize"])
            candidate = ~np.isin(record, entry["skip"])  # the target's documents are not candidates
            scores, record, length, weight = scores[candidate], record[candidate], length[candidate], weight[candidate]
            allowed = np.flatnonzero(length >= self.scorer["min_length"])
            rng = np.random.Generator(np.random.PCG64(plan["seed"]))
            rng.bit_generator.advance(entry["offset"])  # the in-memory selector's draws for these documents
            parts["key"].append(scores[allowed] / plan["temperature"] + rng.gumbel(size=len(allowed)))
            parts["order"].append(entry["offset"] + np.arange(len(allowed), dtype=np.int64))
            parts["weight"].append(weight[allowed].astype(np.float64) if plan["unit"] == "tokens"
                                   else np.ones(len(allowed)))
            parts["file_index"].append(np.full(len(allowed), file_index, dtype=np.int64))
            parts["record"].append(record[allowed])
            self.stat_update("files")
        arrays = {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}
        best = take_until(np.lexsort((arrays["order"], -arrays["key"])), arrays["weight"], plan["budget"])
        _save(out / "keys" / f"{rank:05d}.npz", **{k: v[best] for k, v in arrays.items()})
        return iter(())


def _scorer_dict(params: Any) -> dict:
    s = params.scorer
    return {k: s[k] for k in ("num_buckets", "ngram", "lowercase", "min_length", "length_normalize")}


def _target_counts(params: Any, domain_docs: np.ndarray, domains: set, corpus: Any,
                   seed: int) -> tuple[np.ndarray, set, int]:
    """``(target bucket counts, {(file, record)} held out of the candidates, target documents)``: the target drawn as
    every sharded selection draws it (:func:`~effitrain.selection.sharded_pool.draw_target`), its texts hashed."""
    s = _scorer_dict(params)
    texts, held = draw_target(params.target, domain_docs, domains, corpus, seed)
    counts = np.zeros(s["num_buckets"], dtype=np.int64)
    for text in texts:
        counts += np.bincount(np.asarray(_features(text, s)[0], dtype=np.int64), minlength=s["num_buckets"])
    return counts, held, len(texts)


class ShardedDSIR:
    """The ``selection`` hook of :func:`effitrain.data.sharded.build_sharded_splits` for ``selection=dsir``: called
    with the corpus, the scan's eval documents and the engine settings, it returns the selected ``(file, record)``
    pairs (an ``.npy``, in pool order) and a key naming them; ``info`` is the run summary's selection entry after."""

    def __init__(self, params: Any, seed: int) -> None:
        self.params, self.seed, self.info = params, seed, None
        self.order: Optional[np.ndarray] = None  # the selected pairs in the selector's order (best key first)

    def key_parts(self) -> tuple:
        from effitrain.selection.pipeline import params_dict

        return ("dsir", _VERSION, json.dumps(params_dict(self.params), sort_keys=True), self.seed)

    def __call__(self, out: Path, corpus: Any, eval_docs: Path, data_params: Any, work: Path) -> None:
        import time

        from effitrain.selection.selectors import take_until

        p, s = self.params, _scorer_dict(self.params)
        require_whole_pool_selector(p, "dsir", "gumbel_topk")
        start = time.perf_counter()
        run_stage(data_params, [corpus.reader(), DsirCounts(str(work), scorer=s, eval_docs=str(eval_docs))],
                  work, job_name="dsir-count")
        files = []
        total = np.zeros(s["num_buckets"], dtype=np.int64)
        domains: set = set()
        for f in range(len(corpus.files)):
            path = work / "counts" / f"{f:06d}.npz"
            if not path.is_file():
                continue
            with np.load(path) as z:
                arrays = {k: z[k] for k in ("record", "domain", "domains", "length", "weight")}
                total += z["counts"]
            files.append((f, arrays))
            domains.update(arrays["domains"].tolist())
        target_counts, held, n_target = _target_counts(
            p, domain_rows(files, None if p.target is None else p.target.domain), domains, corpus, self.seed)
        weights_total, offset, plan_files = 0.0, 0, {}
        for f, a in files:
            out_of_pool = np.isin(a["record"], [r for ff, r in held if ff == f])
            keep = ~out_of_pool
            weights_total += float(a["weight"][keep].sum() if p.budget.unit == "tokens" else keep.sum())
            plan_files[str(f)] = {"offset": offset, "skip": a["record"][out_of_pool].tolist()}
            offset += int((keep & (a["length"] >= s["min_length"])).sum())
        if files and offset == 0:
            raise ConfigError(f"selection.scorer.min_length: every candidate has fewer than {s['min_length']} "
                              f"word/punctuation tokens; lower it")
        pool_counts = total - target_counts
        np.save(work / "log_w.npy", log_importance(pool_counts.astype(np.float64), target_counts.astype(np.float64),
                                                   p.scorer["target_smoothing"], p.scorer["pool_mix"]))
        budget = p.budget.fraction * weights_total
        plan = {"seed": self.seed, "temperature": p.selector.get("temperature", 1.0), "unit": p.budget.unit,
                "budget": budget, "n_files": len(corpus.files), "files": plan_files}
        (work / "plan.json").write_text(json.dumps(plan))
        run_stage(data_params, [DsirKeys(str(work), scorer=s, plan=str(work / "plan.json"))],
                  work / "keys_stage", job_name="dsir-keys")
        merged: dict[str, list] = {k: [] for k in ("key", "order", "weight", "file_index", "record")}
        for part in sorted((work / "keys").glob("*.npz")):
            with np.load(part) as z:
                for k in merged:
                    merged[k].append(z[k])
        m = {k: np.concatenate(v) if v else np.zeros(0) for k, v in merged.items()}
        best = take_until(np.lexsort((m["order"], -m["key"])), m["weight"], budget)
        ranked = np.stack([m["file_index"][best], m["record"][best]], axis=1).astype(np.int64).reshape(-1, 2)
        np.save(out / "ranked.npy", ranked)
        np.save(out / "selected.npy", ranked[np.lexsort((ranked[:, 1], ranked[:, 0]))])
        kept_tokens = float(m["weight"][best].sum())
        (out / "info.json").write_text(json.dumps({
            "method": "dsir", "scorer": "dsir", "selector": "gumbel_topk",
            "pool_examples": int(sum(len(a["record"]) for _, a in files) - len(held)),
            "target_examples": n_target, "after_filter_examples": offset, "kept_examples": int(len(best)),
            "budget": {"fraction": p.budget.fraction, "unit": p.budget.unit}, "pool_budget_units": weights_total,
            "kept_budget_units": kept_tokens,
            # the share of the pool's pre-tokenizer pieces kept (the in-memory figure), known when they are the unit
            **({"kept_token_fraction": round(kept_tokens / max(1.0, weights_total), 4)}
               if p.budget.unit == "tokens" else {}),
            "seconds": round(time.perf_counter() - start, 3)}) + "\n")
        finish_stage(work / "keys_stage")
        finish_stage(work)
