"""``curriculum: delt`` -- DELT's data efficacy pipeline (Dai et al. 2025, arXiv 2506.21545; github.com/microsoft/DELT):
data scoring (LQS, :mod:`effitrain.curriculum.lqs`), data selection (top-r: the ``select_ratio`` share of the rows with
the highest scores) and data ordering (folding, :mod:`effitrain.curriculum.folding`), over the packed training rows
(the authors' examples are also fixed-length token chunks, ``max_length: 1025``).

The order is decided once, before training, from the data, the parameters and the seed; every epoch repeats it (the
paper trains one pass).  A resumed run recomputes it (cached scores) and continues from the stored position.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from effitrain.curriculum.folding import FixedOrderSampler, folding_order, top_ratio


def delt_order(scores: np.ndarray, *, select_ratio: float, ordering: str, layers: int, seed: int) -> np.ndarray:
    """Row indices to train on, in order: top-r selection, then folding (``sorting`` = one fold, ascending;
    ``shuffle`` = a random order of the selection, the paper's baseline)."""
    kept = top_ratio(scores, select_ratio)
    if ordering == "shuffle":
        return np.random.default_rng([seed % 2**63, 13]).permutation(kept)
    return kept[folding_order(scores[kept], layers if ordering == "folding" else 1)]


def rank0_scores(compute: Any, num_rows: int) -> tuple[np.ndarray, dict]:
    """``compute()`` on rank 0 only, its scores broadcast to the other ranks: every rank must order the rows the same
    way, and GPU kernels need not give bit-identical scores on every process."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return compute()
    import torch
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    info: dict = {}
    buffer = torch.zeros(num_rows, dtype=torch.float64, device=device)
    if dist.get_rank() == 0:
        scores, info = compute()
        buffer.copy_(torch.as_tensor(scores, dtype=torch.float64))
    dist.broadcast(buffer, src=0)
    return buffer.cpu().numpy(), info


def build_delt(params: Any, packed: Any, *, seed: int, micro_batch_size: int, grad_accum: int, world_size: int,
               rank: int) -> FixedOrderSampler:
    import logging

    from effitrain.curriculum.lqs import cached_lqs
    from effitrain.data.packing import domain_codes, to_numpy

    # token shards are read in blocks (the rows' memory maps); what is held is 8 bytes a row of scores and order
    scores, info = rank0_scores(lambda: cached_lqs(to_numpy(packed), domain_codes(packed), params, seed=seed),
                                len(packed))
    order = delt_order(scores, select_ratio=params.select_ratio, ordering=params.ordering, layers=params.layers,
                       seed=seed)
    logging.getLogger("effitrain.curriculum").info(
        "delt: %d of %d rows kept (top %.0f%% by LQS), %s order%s; scores %s", len(order), len(scores),
        100 * params.select_ratio, params.ordering, f" in {params.layers} folds" if params.ordering == "folding" else "",
        "reused" if info.get("cache_hit") else f"computed on rank 0 ({info})")
    sampler = FixedOrderSampler(order, len(scores), seed=seed, micro_batch_size=micro_batch_size,
                                grad_accum=grad_accum, world_size=world_size, rank=rank)
    sampler.scores = scores
    return sampler
