"""``diversity_kmeans`` on the sharded data engine (issue 24, ``data.executor``): k-means over the embeddings of the
whole pool -- exactly the documents the in-memory ``embedding_kmeans`` scorer and ``cluster_balanced`` selector keep.

1. **pool** and **fit** as for the score-then-budget selections (:mod:`effitrain.selection.sharded_scored`): the
   reference (``model_path``, loaded once per task, on a GPU when there is one) or the pool proxy trained in the
   reduce on the in-memory batches.
2. **embed** (datatrove tasks, :class:`EmbedDocs`): each task embeds its candidates over the in-memory batches of
   ``batch_size`` (the same bits: see :class:`~effitrain.selection.sharded_scored.ScoreKeys`) and writes them with
   their global positions.
3. **k-means** (reduce): the tasks' embeddings are written into one memory-mapped ``(candidates, hidden)`` matrix in
   pool order (and L2-normalized there, a row at a time, as in memory), and the in-memory model is fitted on it --
   scikit-learn's ``KMeans`` up to 20k documents, ``MiniBatchKMeans`` (batches of 4096 rows drawn from the memory
   map) beyond, the same estimator, seed and data; then each row's label and distance, a block of rows at a time.
4. **cut** (reduce): the in-memory ``cluster_balanced`` selector itself over the candidates' scores, labels and
   weights (24 bytes a candidate).

The reduce holds the scalars of every candidate, not its embedding (the matrix is on disk and read through the page
cache); a k-means fitted from per-shard statistics would pick other clusters than the in-memory selection does.
"""

from __future__ import annotations

import json
import pickle
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from effitrain.data.engine import finish_stage, run_stage
from effitrain.selection.sharded_pool import (ColumnBlocks, PoolCounts, RowsFile, candidate_column, candidate_pairs,
                                              load_pool, plan_json, require_whole_pool_selector)
from effitrain.selection.sharded_scored import ScoreKeys, ShardedScored, _on_cuda

_VERSION = 1
_BLOCK = 65536  # rows a block in the reduce's passes over the embeddings


class EmbedDocs(ScoreKeys):
    """Per task ``emb/NNNNN.npy`` (its candidates' embeddings, float32, appended to disk a batch at a time) and
    ``emb/NNNNN.pos.npy`` (their global positions among the candidates)."""

    name = "effitrain embed"

    def run(self, data: Any = None, rank: int = 0, world_size: int = 1) -> Iterator[Any]:
        plan, fitted, embed, batch, eval_set = self._load()
        out = Path(self.out_dir) / "emb"
        rows, positions = RowsFile(out / f"{rank:05d}.npy", np.float32), ColumnBlocks()
        with self._threads(fitted):
            for first, docs in self._blocks(data, plan, eval_set, batch):
                with self.track_time("embed"):
                    rows.append(embed([d.text for d in docs]))
                positions.add(pos=first + np.arange(len(docs), dtype=np.int64))
                self.stat_update("documents", value=len(docs))
        position = positions.arrays({"pos": np.int64})["pos"]
        tmp = out / f".{rank:05d}.pos.tmp.npy"
        np.save(tmp, position)
        tmp.replace(out / f"{rank:05d}.pos.npy")
        rows.publish()
        return iter(())


class ShardedKMeans(ShardedScored):
    """The ``selection`` hook of :func:`effitrain.data.sharded.build_sharded_splits` for ``selection=diversity_kmeans``
    (scorer ``embedding_kmeans``, selector ``cluster_balanced``)."""

    def key_parts(self) -> tuple:
        return ("kmeans", _VERSION, *super().key_parts())

    def __call__(self, out: Path, corpus: Any, eval_docs: Path, data_params: Any, work: Path) -> None:
        p = self.params
        sp = p.scorer_block.params
        require_whole_pool_selector(p, "embedding_kmeans", "cluster_balanced")
        start = time.perf_counter()
        run_stage(data_params, [corpus.reader(), PoolCounts(str(work), eval_docs=str(eval_docs))], work,
                  job_name=f"{self.method}-pool")
        pool = load_pool(work, len(corpus.files), p.target, corpus, self.seed)
        fitted = self._fit(pool, corpus, work)
        scorer_info = fitted.pop("info")
        (work / "fitted.pkl").write_bytes(pickle.dumps(fitted))
        plan_json(work / "plan.json", pool, seed=self.seed, n_files=len(corpus.files), eval_docs=str(eval_docs))
        run_stage(data_params, [corpus.reader(), EmbedDocs(str(work), plan=str(work / "plan.json"),
                                                           fitted=str(work / "fitted.pkl"), reader=corpus.reader(),
                                                           cuda=_on_cuda(fitted))],
                  work / "embed_stage", job_name=f"{self.method}-embed")
        n = pool.candidates
        x = self._matrix(work, n, sp.normalize)
        from effitrain.selection.scorers.lm import kmeans_fit

        labels, centres = kmeans_fit(x, sp.num_clusters, self.seed)
        dist = np.concatenate([np.linalg.norm(x[i:i + _BLOCK] - centres[labels[i:i + _BLOCK]], axis=1)
                               for i in range(0, n, _BLOCK)] or [np.zeros(0)])
        weights = candidate_column(pool, "weight", np.float64) if p.budget.unit == "tokens" else np.ones(n)
        budget = p.budget.fraction * float(weights.sum())
        chosen = np.sort(np.asarray(p.selector_block.build().select(
            np.asarray(-dist, dtype=np.float64), labels, weights, budget, np.random.default_rng(self.seed)),
            dtype=np.int64))
        pairs = candidate_pairs(pool, chosen)
        np.save(out / "selected.npy", pairs)
        kept_units, total = float(weights[chosen].sum()), float(weights.sum())
        (out / "info.json").write_text(json.dumps({
            "method": self.method, "scorer": "embedding_kmeans", "selector": "cluster_balanced", "pool_examples": n,
            "target_examples": len(pool.target_texts), "after_filter_examples": n, "kept_examples": int(len(pairs)),
            "budget": {"fraction": p.budget.fraction, "unit": p.budget.unit}, "pool_budget_units": total,
            "kept_budget_units": kept_units,
            **({"kept_token_fraction": round(kept_units / max(1.0, total), 4)} if p.budget.unit == "tokens" else {}),
            **{f"scorer_{k}": v for k, v in scorer_info.items()},
            "scorer_clusters": int(labels.max() + 1) if n else 0, "scorer_embedding_dim": int(x.shape[1]),
            "seconds": round(time.perf_counter() - start, 3)}) + "\n")
        del x
        finish_stage(work / "embed_stage")
        finish_stage(work)

    @staticmethod
    def _matrix(work: Path, n: int, normalize: bool) -> np.ndarray:
        """The tasks' embeddings as one memory map in pool order, L2-normalized a row at a time when asked."""
        parts = sorted(p for p in (work / "emb").glob("*.npy")  # not a killed task's temporary (".NNNNN.tmp...")
                       if not p.name.endswith(".pos.npy") and not p.name.startswith("."))
        width = next((np.load(p, mmap_mode="r").shape[1] for p in parts if np.load(p, mmap_mode="r").size), 0)
        x = np.lib.format.open_memmap(work / "embeddings.npy", mode="w+", dtype=np.float32, shape=(n, width))
        for part in parts:
            rows = np.load(part, mmap_mode="r")
            positions = np.load(part.with_name(part.name.replace(".npy", ".pos.npy")))
            for i in range(0, len(positions), _BLOCK):
                block = np.asarray(rows[i:i + _BLOCK])
                if normalize:  # as in memory: x / max(|x|, 1e-8), row by row
                    block = block / np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-8)
                x[positions[i:i + _BLOCK]] = block
        x.flush()
        return x
