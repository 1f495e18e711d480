"""Score-then-budget selections on the sharded data engine (issue 24, ``data.executor``): ``quality_classifier``,
``perplexity``, ``zip_fit`` and ``random`` as map, reduce, map, reduce -- exactly the documents the in-memory
:func:`~effitrain.selection.pipeline.build_scored` keeps from ``dataset=local``.

1. **pool** (datatrove tasks, :class:`~effitrain.selection.sharded_pool.PoolCounts`): per file, every train
   document's record, domain and budget weight.
2. **fit** (reduce, this process): the target drawn as in memory; the budget (``fraction`` of the candidates'
   weight); what the scorer learns from the pool before scoring -- the quality classifier's negatives are the
   candidates at ``sort(default_rng(seed).permutation(n)[:negatives])``, read back from their files, so the
   classifier is fitted on the same rows in the same order as in memory; the perplexity scorer's pool proxy is
   trained on the batches ``train_steps`` draws in memory (their few documents read back) and saved for the tasks,
   or its ``model_path`` is loaded by each task once (on a GPU when there is one).
3. **score** (datatrove tasks, :class:`ScoreKeys`): the fitted scorer loaded once per task scores the task's
   candidates (the scorers' own functions: ``decision_function`` per row, ``ncd_scores`` per text, the model's
   losses over the in-memory batches -- see :class:`ScoreKeys`); each candidate also gets the selector's tie-breaking draw, ``rng.random`` of the
   in-memory ``default_rng(seed)`` at its global candidate position.  Each task writes its candidates sorted by the
   selector's order.
4. **cut** (reduce, :class:`~effitrain.selection.sharded_pool.SortedParts`): the window of the global order holding
   the budget -- ``topk`` from its start, ``window`` where its ``position`` puts it -- found by binary searches over
   the tasks' sorted arrays (exact: the weights are integers).  ``random`` needs no score: the reduce draws the
   in-memory permutation of the candidates.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import pickle
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from effitrain.data.engine import PipelineStep, _per_file, batched, finish_stage, run_stage
from effitrain.registry import ConfigError
from effitrain.selection import sharded_pool
from effitrain.selection.selectors import take_until
from effitrain.selection.sharded_pool import (ColumnBlocks, PoolCounts, SortedParts, candidate_column,
                                              candidate_pairs, draws, eval_pairs, load_arrays, load_pool, plan_json,
                                              read_texts, save_arrays, sort_part)

_VERSION = 1
SCORERS = ("quality_classifier", "zip_fit", "perplexity", "uniform")  # the scorers with a per-document map form here
SELECTORS = ("topk", "window", "random")
MODEL_SCORERS = ("perplexity", "embedding_kmeans")  # a reference model (or the pool proxy) scores in batches


class ScoreKeys(PipelineStep):
    """Per task ``keys/NNNNN/``: its candidates' ``primary`` (the selector's ascending key), ``tie``, ``weight``,
    running ``cumw``, ``file_index`` and ``record``, sorted by ``(primary, tie)``, one ``.npy`` each (the reduce
    maps them).

    A model scorer's score of a document depends on the batch it is in (padding to the batch's longest document
    changes the shapes, hence the rounding), so a model scorer scores the in-memory batches: candidates
    ``[k B, (k + 1) B)`` of the global order.  The file holding a batch's first candidate scores it, reading the head
    of the following file(s) when the batch runs past its own end; a file skips the head that an earlier file's
    batch covered.  Per-document scorers (the classifier's per-row dot product, ZIP-FIT's compressions) score a file
    at a time."""

    name = "effitrain score"
    type = "🎯 - SELECTION"

    def __init__(self, out_dir: str, *, plan: str, fitted: str, reader: Any, cuda: bool = False) -> None:
        super().__init__()
        self.out_dir, self.plan, self.fitted, self.reader = out_dir, plan, fitted, reader
        self.needs_fresh_process = cuda  # the engine's local executor spawns, not forks, the tasks of a CUDA scorer

    def _following(self, plan: dict, eval_set: set, file_index: int, need: int) -> list:
        """The first ``need`` candidates after file ``file_index``, read from the files that follow it."""
        out: list = []
        for f in range(file_index + 1, plan["n_files"]):
            entry = plan["files"].get(str(f))
            if entry is None:
                continue
            skip = set(entry["skip"])
            for doc in self.reader.run(None, rank=f, world_size=plan["n_files"]):  # that file alone
                if (f, doc.metadata["record"]) in eval_set or doc.metadata["record"] in skip:
                    continue
                out.append(doc)
                if len(out) == need:
                    return out
        return out

    def _blocks(self, data: Any, plan: dict, eval_set: set, batch: int) -> Iterator[tuple[int, list]]:
        """The task's candidates a block at a time, streamed from its files: ``(global position of the block's first
        document, the documents)`` -- for a model scorer each block one of the in-memory batches (the last batch a
        file starts completed from the following files), else at most ``sharded_pool.BLOCK`` documents of one file."""
        for file_index, docs in _per_file(data):
            entry = plan["files"].get(str(file_index))
            if entry is None:
                continue
            skip = set(entry["skip"])
            mine = (d for d in docs if (file_index, d.metadata["record"]) not in eval_set
                    and d.metadata["record"] not in skip)
            position = entry["offset"]
            if batch:
                position = -(-entry["offset"] // batch) * batch  # this file's first batch
                mine = itertools.islice(mine, position - entry["offset"], None)  # an earlier file's batch has them
            for block in batched(mine, batch or sharded_pool.BLOCK):
                if batch and len(block) < batch:
                    block += self._following(plan, eval_set, file_index, batch - len(block))
                yield position, block
                position += len(block)

    def _load(self) -> tuple[dict, dict, Any, int, set]:
        plan = json.loads(Path(self.plan).read_text())
        fitted = pickle.loads(Path(self.fitted).read_bytes())  # written by this run's reduce, never by a user
        score, batch = _scorer(fitted)
        return plan, fitted, score, batch, eval_pairs(plan["eval_docs"])

    @staticmethod
    def _threads(fitted: dict) -> Any:
        """The in-memory model scorer's threads (one for a small model on CPU): the same rounding."""
        from effitrain.selection.refmodel import cpu_threads

        return cpu_threads(fitted["params"]) if fitted["scorer"] in MODEL_SCORERS else contextlib.nullcontext()

    def run(self, data: Any = None, rank: int = 0, world_size: int = 1) -> Iterator[Any]:
        from effitrain.selection.base import count_tokens

        plan, fitted, score, batch, eval_set = self._load()
        parts = ColumnBlocks()
        with self._threads(fitted):
            for first, docs in self._blocks(data, plan, eval_set, batch):
                with self.track_time("score"):
                    scores = np.asarray(score([d.text for d in docs]), dtype=np.float64)
                key = scores if plan["descending"] else -scores
                parts.add(primary=-key if plan["selector"] == "topk" else scores, tie=draws(plan["seed"], first,
                                                                                           len(docs)),
                          weight=np.array([count_tokens(d.text) if plan["unit"] == "tokens" else 1 for d in docs],
                                          dtype=np.float64),
                          file_index=np.array([d.metadata["file"] for d in docs], dtype=np.int64),
                          record=np.array([d.metadata["record"] for d in docs], dtype=np.int64))
                self.stat_update("documents", value=len(docs))
        arrays = parts.arrays({"primary": np.float64, "tie": np.float64, "weight": np.float64,
                               "file_index": np.int64, "record": np.int64})
        save_arrays(Path(self.out_dir) / "keys" / f"{rank:05d}", **sort_part(**arrays))
        return iter(())


def _on_cuda(fitted: dict) -> bool:
    if fitted["scorer"] not in MODEL_SCORERS:
        return False
    from effitrain.selection.refmodel import device_of

    return device_of(fitted["params"]).startswith("cuda")


def _scorer(fitted: dict) -> tuple[Any, int]:
    """``(texts -> float64 scores as the in-memory scorer computes each, the batch size that matters or 0)``."""
    if fitted["scorer"] == "quality_classifier":
        vec, clf = fitted["vectorizer"], fitted["classifier"]
        return (lambda texts: np.asarray(clf.decision_function(vec.transform(texts)), dtype=np.float64)), 0
    if fitted["scorer"] == "zip_fit":
        from effitrain.selection.scorers.zip_fit import ncd_scores

        kw = fitted["zip_fit"]
        return (lambda texts: np.asarray(ncd_scores(texts, **kw), dtype=np.float64)), 0
    from effitrain.selection.refmodel import (ByteEncoder, device_of, example_losses, learnable_token_medians,
                                              load_reference)

    p = fitted["params"]
    dev = device_of(p)
    if fitted["proxy_dir"] is None:
        model, encode = load_reference(p)  # once per task
    else:
        import torch
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(fitted["proxy_dir"], torch_dtype=torch.float32).to(dev).eval()
        encode = ByteEncoder(p.max_length)
    if fitted["scorer"] == "embedding_kmeans":
        from effitrain.selection.embeddings import embed

        return (lambda texts: embed(model, encode, texts, dev, p.layer).astype(np.float32)), p.batch_size
    if p.statistic == "topk_median":
        return (lambda texts: np.asarray(learnable_token_medians(model, encode, texts, dev, p.top_k),
                                         dtype=np.float64)), p.batch_size
    return (lambda texts: np.asarray(example_losses(model, encode, texts, dev), dtype=np.float64)), p.batch_size


class ShardedScored:
    """The ``selection`` hook of :func:`effitrain.data.sharded.build_sharded_splits` for the score-then-budget
    selections (see the module); ``info`` is the run summary's selection entry after."""

    def __init__(self, method: str, params: Any, seed: int) -> None:
        self.method, self.params, self.seed, self.info = method, params, seed, None

    def key_parts(self) -> tuple:
        from effitrain.selection.pipeline import params_dict

        return (self.method, _VERSION, json.dumps(params_dict(self.params), sort_keys=True), self.seed)

    def _fit(self, pool: Any, corpus: Any, work: Path) -> dict:
        """What the score tasks load: the scorer's state learnt from the target and the pool."""
        p, s = self.params, self.params.scorer
        if s["name"] in MODEL_SCORERS:
            sp = p.scorer_block.params
            if sp.model_path:
                return {"scorer": s["name"], "params": sp, "proxy_dir": None, "info": {"reference": "model_path"}}
            return {"scorer": s["name"], "params": sp, **self._pool_proxy(sp, pool, corpus, work)}
        if s["name"] == "quality_classifier":
            from sklearn.linear_model import LogisticRegression

            from effitrain.selection.scorers.quality import _vectorizer

            sp = p.scorer_block.params
            n = pool.candidates
            positions = np.sort(np.random.default_rng(self.seed).permutation(n)[:sp.negatives])
            pairs = [(int(f), int(r)) for f, r in candidate_pairs(pool, positions)]
            texts = read_texts(corpus, pairs)
            neg = [texts[pair] for pair in pairs]
            vec = _vectorizer(sp)
            x = vec.transform(pool.target_texts + neg)
            y = np.r_[np.ones(len(pool.target_texts)), np.zeros(len(neg))]
            clf = LogisticRegression(C=sp.C, class_weight="balanced", max_iter=2000, random_state=self.seed)
            clf.fit(x, y)
            return {"scorer": "quality_classifier", "vectorizer": vec, "classifier": clf,
                    "info": {"train_accuracy": round(float(clf.score(x, y)), 4), "negatives": len(neg)}}
        from effitrain.selection.scorers.zip_fit import _clen

        sp = p.scorer_block.params
        targets = [t[:sp.max_chars].encode("utf-8") for t in pool.target_texts[:sp.max_target]]
        return {"scorer": "zip_fit", "info": {"target_used": len(targets)},
                "zip_fit": {"targets": targets, "target_lens": [_clen(t, sp.level) for t in targets],
                            "max_chars": sp.max_chars, "level": sp.level}}

    def _pool_proxy(self, sp: Any, pool: Any, corpus: Any, work: Path) -> dict:
        """The byte-level pool proxy (:func:`~effitrain.selection.refmodel.pool_proxy`), trained here on the same
        random batches of candidates as in memory -- ``train_steps``' own draws, the few texts read back from their
        files -- and saved for the score tasks."""
        from effitrain.selection.refmodel import byte_proxy, cpu_threads, device_of, train_steps

        n, rng, picks = pool.candidates, np.random.default_rng(self.seed), set()
        for _ in range(sp.proxy_steps):  # train_steps' draws, to know which documents to read
            picks.update(rng.choice(np.arange(n), size=min(sp.proxy_batch_size, n), replace=False).tolist())
        positions = np.array(sorted(picks), dtype=np.int64)
        pairs = [(int(f), int(r)) for f, r in candidate_pairs(pool, positions)]
        texts = read_texts(corpus, pairs)
        by_position = {int(q): texts[pair] for q, pair in zip(positions, pairs)}
        with cpu_threads(sp):
            model, encode = byte_proxy(sp, self.seed)
            losses = train_steps(model, encode, _TextsAt(by_position, n), steps=sp.proxy_steps,
                                 batch_size=sp.proxy_batch_size, lr=sp.proxy_lr, seed=self.seed,
                                 device=device_of(sp))
        folder = work / "proxy"
        model.save_pretrained(folder)
        return {"proxy_dir": str(folder),
                "info": {"reference": "pool proxy", "proxy": "trained",
                         "proxy_first_loss": round(losses[0], 4) if losses else None,
                         "proxy_last_loss": round(losses[-1], 4) if losses else None}}

    def __call__(self, out: Path, corpus: Any, eval_docs: Path, data_params: Any, work: Path) -> None:
        p = self.params
        scorer, selector = p.scorer["name"], p.selector["name"]
        if scorer not in SCORERS or selector not in SELECTORS or getattr(p, "domains", None) is not None:
            raise ConfigError(f"selection: data.executor runs scorer {'/'.join(SCORERS)} with selector "
                              f"{'/'.join(SELECTORS)} over the whole pool; drop selection.domains or data.executor")
        start = time.perf_counter()
        run_stage(data_params, [corpus.reader(), PoolCounts(str(work), eval_docs=str(eval_docs))], work,
                  job_name=f"{self.method}-pool")
        pool = load_pool(work, len(corpus.files), p.target, corpus, self.seed)
        unit = p.budget.unit
        total = pool.weights_total(unit)
        budget = p.budget.fraction * total
        scorer_info: dict = {}
        if selector == "random":  # no score decides: the in-memory permutation of the candidates, cut at the budget
            n = pool.candidates
            weights = candidate_column(pool, "weight", np.float64) if unit == "tokens" else np.ones(n)
            chosen = np.sort(take_until(np.random.default_rng(self.seed).permutation(n), weights, budget))
            selected = candidate_pairs(pool, chosen)
            kept_units = float(weights[chosen].sum())
        else:
            fitted = self._fit(pool, corpus, work)
            scorer_info = fitted.pop("info")
            (work / "fitted.pkl").write_bytes(pickle.dumps(fitted))
            plan_json(work / "plan.json", pool, seed=self.seed, unit=unit, selector=selector, n_files=len(corpus.files),
                      descending=bool(p.selector.get("descending", True)), eval_docs=str(eval_docs))
            run_stage(data_params, [corpus.reader(), ScoreKeys(str(work), plan=str(work / "plan.json"),
                                                               fitted=str(work / "fitted.pkl"),
                                                               reader=corpus.reader(), cuda=_on_cuda(fitted))],
                      work / "score_stage", job_name=f"{self.method}-score")
            sorted_parts = SortedParts([load_arrays(part) for part in sorted((work / "keys").iterdir())
                                        if not part.name.startswith(".")])
            start_mass = 0.0
            if selector == "window":  # WindowSelector: where the window of the ascending scores starts
                spare = max(0.0, sorted_parts.total() - float(budget))
                start_mass = {"low": 0.0, "medium": spare / 2.0, "high": spare}[p.selector["position"]]
            picks = sorted_parts.window(start_mass, budget)
            selected = np.concatenate(
                [np.stack([a["file_index"][i], a["record"][i]], axis=1) for a, i in zip(sorted_parts.parts, picks)]
                or [np.zeros((0, 2))]).astype(np.int64).reshape(-1, 2)
            selected = selected[np.lexsort((selected[:, 1], selected[:, 0]))]
            kept_units = float(sum(a["weight"][i].sum() for a, i in zip(sorted_parts.parts, picks)))
        np.save(out / "selected.npy", selected)
        (out / "info.json").write_text(json.dumps({
            "method": self.method, "scorer": scorer, "selector": selector, "pool_examples": pool.candidates,
            "target_examples": len(pool.target_texts), "after_filter_examples": pool.candidates,
            "kept_examples": int(len(selected)), "budget": {"fraction": p.budget.fraction, "unit": unit},
            "pool_budget_units": total, "kept_budget_units": kept_units,
            **({"kept_token_fraction": round(kept_units / max(1.0, total), 4)} if unit == "tokens" else {}),
            **{f"scorer_{k}": v for k, v in scorer_info.items()},
            "seconds": round(time.perf_counter() - start, 3)}) + "\n")
        finish_stage(work / "score_stage")
        finish_stage(work)


class _TextsAt:
    """What ``train_steps`` reads of a dataset -- its length and ``select(rows)["text"]`` -- over the few candidates
    it draws, by global candidate position."""

    def __init__(self, texts: dict, n: int) -> None:
        self.texts, self.n = texts, n

    def __len__(self) -> int:
        return self.n

    def select(self, rows: Any) -> dict:
        return {"text": [self.texts[int(r)] for r in rows]}
