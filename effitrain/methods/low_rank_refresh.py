"""Weight refactorization and momentum reset for low-rank pre-training (Glentis et al., 2505.22922).

Every ``interval`` optimizer steps, on each low-rank layer ``W = s·B·A (+ S)`` (``peft=sltrain``):

* **weight refactorization**: the product ``B·A`` is re-split from its SVD, ``B·A = U Σ Vᵀ``,
  ``B ← U Σ^½``, ``A ← Σ^½ Vᵀ``.  The layer computes the same function before and after; what changes is the
  factors' balance (equal singular values on both sides), which the paper reports speeds up low-rank training.
  The factors' optimizer state is dropped, since their coordinates changed.
* **momentum reset**: the optimizer state of every parameter is dropped, so AdamW starts afresh (moments zero, bias
  correction from step 1) — what the authors' released code does when it rebuilds its AdamW.

The SVD of ``B·A`` is taken through two thin QRs and an r x r SVD (``B = Q_B R_B``, ``Aᵀ = Q_A R_A``,
``R_B R_Aᵀ = U_s Σ V_sᵀ``, ``U = Q_B U_s``, ``V = Q_A V_s``), never forming the m x n product.
"""

from __future__ import annotations

from typing import Any

import torch

from effitrain.engine.events import Hook
from effitrain.linalg import svd


def low_rank_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    from effitrain.models.sltrain import SLTrainLinear
    return [m for m in model.modules() if isinstance(m, SLTrainLinear)]


@torch.no_grad()
def refactorize(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced factors of ``B @ A``: ``(U Σ^½, Σ^½ Vᵀ)`` from its rank-r SVD."""
    work = torch.promote_types(B.dtype, torch.float32)   # bf16/fp16 factors are decomposed in fp32
    qb, rb = torch.linalg.qr(B.to(work))
    qa, ra = torch.linalg.qr(A.to(work).T)
    u, s, vh = svd(rb @ ra.T)
    root = s.sqrt()
    return ((qb @ u) * root).to(B.dtype), (root[:, None] * (vh @ qa.T)).to(A.dtype)


class LowRankRefresh(Hook):
    name = "low_rank_refresh"

    def __init__(self, interval: int, refactorize: bool = True, reset_momentum: bool = True) -> None:
        self.interval = interval
        self.refactorize = refactorize
        self.reset_momentum = reset_momentum
        self.refreshes = 0
        self._layers: list[torch.nn.Module] = []
        self._optimizer: Any = None

    def on_fit_start(self, state: Any) -> None:
        self._layers = low_rank_layers(state.model)
        if self.refactorize and not self._layers:
            raise ValueError("methods.low_rank_refresh.refactorize: the model has no low-rank layer; set peft=sltrain "
                             "or refactorize=false")
        self._optimizer = state.optimizer

    def on_step_end(self, state: Any) -> None:
        if state.step % self.interval != 0:
            state.metrics["low_rank_refreshes"] = self.refreshes   # on every log line, not only a refresh's
            return
        from effitrain.methods.lisa import _unwrap_optimizer

        inner, mapping = _unwrap_optimizer(self._optimizer) if self._optimizer is not None else (None, {})
        if self.refactorize:
            for layer in self._layers:
                layer.B.data, layer.A.data = refactorize(layer.B.data, layer.A.data)
                for p in (layer.B, layer.A):
                    master = mapping.get(id(p))   # a mixed-precision wrapper's fp32 copy must hold the new factors
                    if master is not None:
                        master.data.copy_(p.data)
                    if inner is not None:
                        inner.state.pop(master if master is not None else p, None)
        if self.reset_momentum and inner is not None:
            inner.state.clear()
        self.refreshes += 1
        state.metrics["low_rank_refreshes"] = self.refreshes

    def state_dict(self) -> dict[str, Any]:
        return {"refreshes": self.refreshes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.refreshes = int(state["refreshes"])


def build_low_rank_refresh(params: Any) -> LowRankRefresh:
    return LowRankRefresh(interval=params.interval, refactorize=params.refactorize,
                          reset_momentum=params.reset_momentum)
