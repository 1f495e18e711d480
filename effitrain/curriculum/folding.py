"""Folding ordering (DELT, Dai et al. 2025, arXiv 2506.21545; authors' ``data_ordering/folding.py``) and a sampler
that trains rows in a fixed, precomputed order.

Folding: sort the examples by score, ascending, then deal them into ``L`` folds by position (fold ``l`` takes
sorted positions ``l, l + L, l + 2L, ...``) and concatenate the folds.  Every fold runs from the lowest score to the
highest, so training goes low-to-high ``L`` times over, without repeating an example.  ``L = 1`` is plain sorting.

Reusable by any curriculum with a per-row score: :func:`folding_order` is pure numpy, :class:`FixedOrderSampler` takes
any order.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from effitrain.curriculum.samplers import ResumableBatchSampler


def folding_order(scores: np.ndarray, layers: int) -> np.ndarray:
    """Indices of ``scores`` in folding order (ties keep index order, as Python's stable ``sorted``)."""
    if layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    ranked = np.argsort(np.asarray(scores), kind="stable")
    return np.concatenate([ranked[fold::layers] for fold in range(layers)])


def top_ratio(scores: np.ndarray, ratio: float) -> np.ndarray:
    """DELT's top-r selection: the ``int(N * ratio)`` highest scores (all of them at ratio 1), as indices in index
    order.  The authors sort ascending (stable) and keep the last ``k``."""
    k = int(len(scores) * ratio)
    ranked = np.argsort(np.asarray(scores), kind="stable")
    return np.sort(ranked[len(ranked) - k:]) if k < len(ranked) else np.arange(len(scores))


class FixedOrderSampler(ResumableBatchSampler):
    """Rows ``order`` in that order, the same every epoch (an epoch = one pass over ``order``).

    The state is the base class's (epoch, position); the order is recomputed identically on resume by the builder
    (it is a function of the data and the configuration), and ``order_digest`` in the state catches a mismatch."""

    def __init__(self, order: np.ndarray, num_rows: int, **layout: Any) -> None:
        self.order = np.asarray(order, dtype=np.int64)
        super().__init__(len(self.order), **layout)
        self.total_rows = int(num_rows)

    def epoch_order(self, epoch: int) -> np.ndarray:
        return self.order

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "order_digest": _digest(self.order)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from effitrain.registry import ConfigError
        if state.get("order_digest", _digest(self.order)) != _digest(self.order):
            raise ConfigError("resume: the checkpoint's row order differs from the one this run computed; the data "
                              "or the curriculum's parameters changed")
        super().load_state_dict(state)


def _digest(order: np.ndarray) -> str:
    import hashlib
    return hashlib.sha256(np.ascontiguousarray(order, dtype=np.int64).tobytes()).hexdigest()[:16]
