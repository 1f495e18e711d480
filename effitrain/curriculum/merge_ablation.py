"""Data ablations by modular training and merging (Na, Magnusson, Jha, Sherborne, Strubell, Dodge and Dasigi 2024,
"Scalable Data Ablation Approximations for Language Models through Modular Training and Merging", 2410.15661).

Instead of training one model per candidate mixture, train one model per data *partition* (each continued from the
same seed model), and estimate a mixture's perplexity by the perplexity of the parameter average of the partition
models, weighted by the mixture.  The paper finds that this proxy's perplexity is highly correlated with that of
a model actually trained on the mixture, so the mixtures can be ranked at the cost of one run per partition plus
one evaluation per candidate.

Three pieces (torch for the average, numpy for the rest):

1. :func:`simplex_grid` — the candidate mixtures: every weighting of the partitions on a grid of the simplex;
2. :func:`merged_state_dict` — the weighted parameter average of the partition models;
3. :func:`evaluate_candidates` — each candidate's merged model's mean token loss on evaluation rows (perplexity
   is its exp), loaded into one model instance in turn.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Mapping, Sequence

import numpy as np


def simplex_grid(k: int, step: float) -> np.ndarray:
    """``[n, k]``: every vector of ``k`` non-negative multiples of ``step`` that sum to 1 (the vertices, the edges'
    points, ..., the centre where ``1/step`` divides evenly), in lexicographic order."""
    units = round(1.0 / step)
    if k < 1 or units < 1 or abs(units * step - 1.0) > 1e-9:
        raise ValueError(f"simplex_grid: step must divide 1 evenly (1/2, 1/4, 0.2, ...), got {step}")
    rows = [c for c in itertools.product(range(units + 1), repeat=k) if sum(c) == units]
    return np.array(rows, dtype=np.float64)[::-1] / units


def merged_state_dict(state_dicts: Sequence[Mapping[str, Any]], weights: Sequence[float]) -> dict[str, Any]:
    """``sum_i w_i * state_dicts[i]`` (weights renormalised to sum to 1) for every floating-point tensor; other
    tensors (integer buffers) are the same in every partition model and are taken from the first."""
    import torch

    w = np.asarray(weights, dtype=np.float64)
    if len(w) != len(state_dicts) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"merged_state_dict: need one non-negative weight per model with a positive sum, got {list(w)}")
    w = w / w.sum()
    keys = list(state_dicts[0])
    for i, sd in enumerate(state_dicts[1:], start=1):
        if list(sd) != keys:
            raise ValueError(f"merged_state_dict: model {i} has other parameters than model 0; the partition "
                             f"models must share one architecture")
    merged = {}
    for key in keys:
        first = state_dicts[0][key]
        if not torch.is_floating_point(first):
            merged[key] = first.clone()
            continue
        acc = torch.zeros_like(first, dtype=torch.float64)
        for wi, sd in zip(w, state_dicts):
            if wi > 0:
                acc += float(wi) * sd[key].to(torch.float64)
        merged[key] = acc.to(first.dtype)
    return merged


def evaluate_candidates(model: Any, state_dicts: Sequence[Mapping[str, Any]], candidates: np.ndarray,
                        rows: np.ndarray, *, batch_size: int = 8) -> list[float]:
    """The mean next-token loss of ``model`` with each candidate's merged weights on ``rows`` (``[n, seq_len]``
    token ids).  ``model`` is one instance of the partition models' architecture; its weights are replaced."""
    import torch

    from effitrain.objectives.common import mean_token_loss

    losses = []
    ids = torch.from_numpy(np.ascontiguousarray(rows)).long()
    model.eval()
    with torch.no_grad():
        for weights in candidates:
            model.load_state_dict(merged_state_dict(state_dicts, weights))
            total, count = 0.0, 0
            for start in range(0, len(ids), batch_size):
                batch = ids[start:start + batch_size]
                total += float(mean_token_loss(model(input_ids=batch).logits, batch)) * len(batch)
                count += len(batch)
            losses.append(total / count)
    return losses


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf
