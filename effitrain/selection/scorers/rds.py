"""RDS+ scorer ("Large-Scale Data Selection for Instruction Tuning", Ivison et al. 2025, arXiv 2503.01807; authors'
code hamishivi/automated-instruction-selection): representation similarity to the target, round-robin over tasks.

1. **Embeddings**: the reference model's last hidden states, *position-weighted* mean-pooled (token t of a document
   weighs t / sum(1..len), see :mod:`effitrain.selection.embeddings`), L2-normalized -- candidates and target alike.
2. **Similarity**: cosine of every candidate to every target example; within a target task a candidate's score is
   its **maximum** over that task's examples (the authors' ``--selection_method max``; ``task_reduce: mean`` is
   their other option).
3. **Round-robin** over tasks (``get_top_aggregated_influences.py --aggregation_method round_robin``): every task
   ranks the candidates by its score; in turn each task pops its next-ranked candidate, which joins the selection
   unless another task already took it (then that turn adds nothing, as in their code).  The resulting order does
   not depend on the budget, so the scorer emits it as the score (``N - position``) and the ``topk`` selector cuts
   it where the budget is reached: the kept set is exactly the authors' first k for every k.

Tasks come from ``selection.target.task_field`` (a domain target is one task: then the order is plain top-k by
similarity).  Cost: one forward pass per candidate and target example, an N x T product, K sorts of N.
"""

from __future__ import annotations

import numpy as np

from effitrain.selection.base import Scores
from effitrain.selection.embeddings import embed_dataset, embed_list, normalize_rows
from effitrain.selection.refmodel import ModelScorer, device_of, reference_or_proxy


def task_scores(sims: np.ndarray, tasks: np.ndarray, reduce: str = "max") -> tuple[np.ndarray, list]:
    """``sims``: N x T cosines, ``tasks``: T labels -> (N x K per-task scores, the K task names in column order)."""
    names = sorted(set(tasks.tolist()))
    agg = np.max if reduce == "max" else np.mean
    return np.stack([agg(sims[:, tasks == t], axis=1) for t in names], axis=1), names


def round_robin_order(per_task: np.ndarray) -> np.ndarray:
    """N x K scores -> the candidates in round-robin order (a permutation of ``range(N)``).

    Turn r of task k pops the r-th best candidate of task k; tasks take turns k = 0, 1, ..., K-1, then the next
    round.  A candidate joins at its first pop; a later pop of it adds nothing.  Ties within a task keep pool order.
    """
    n, k = per_task.shape
    ranked = np.stack([np.argsort(-per_task[:, t], kind="stable") for t in range(k)], axis=1)  # N x K
    pops = ranked.reshape(-1)            # round 0 of every task, then round 1, ...
    _, first = np.unique(pops, return_index=True)
    return pops[np.sort(first)]


class RDSPlusScorer(ModelScorer):
    def _score(self, candidates, ctx) -> Scores:
        p = self.params
        dev = device_of(p)
        model, encode, info, tag = reference_or_proxy(p, candidates, ctx, "rds_plus")
        x = normalize_rows(embed_dataset(candidates, model, encode, device=dev, layer=p.layer, pooling=p.pooling,
                                         model_tag=tag, max_length=p.max_length, batch_size=p.batch_size))
        tgt = ctx.target
        y = normalize_rows(embed_list(list(tgt["text"]), model, encode, device=dev, layer=p.layer,
                                      pooling=p.pooling, batch_size=p.batch_size))
        tasks = (np.asarray(tgt["task"], dtype=object).astype(str) if "task" in tgt.column_names
                 else np.zeros(len(tgt), dtype=object).astype(str))
        per_task, names = task_scores(x @ y.T, tasks, p.task_reduce)
        order = round_robin_order(per_task)
        scores = np.empty(len(order), dtype=np.float64)
        scores[order] = len(order) - np.arange(len(order))
        return Scores(scores=scores,
                      info={**info, "target_tasks": len(names), "target_used": int(len(tgt)),
                            "embedding_dim": int(x.shape[1]), "pooling": p.pooling,
                            "best_similarity": [round(float(v), 4) for v in per_task.max(axis=0)]})
