"""TriAdaptLoRA's rank growth (Liang, Wang & Zeng, 2501.08008) as an engine hook over the ``tri_adapt_lora`` peft
block (effitrain.peft.tri_adapt).

Every ``interval`` optimizer steps after ``warmup``, while the total rank is below the budget: each module's
importance (the change of its normalized Frobenius norm ``||C||_F / blocks`` since the previous allocation) is
computed, the schedule says how many modules may grow (remaining budget x progress, linearly or exponentially),
the k-th largest importance is the threshold, and every module at or above it gains ``add_rank`` ranks - the
authors' ``RankAllocator.update_and_increase``, called after the optimizer step.  Their orthogonal regulariser
(``orth_reg_weight``) is added to the loss after the forward pass.

The rank of every module, the last normalized norms and the growth log are the hook's ``state_dict``: a resumed run
has the ranks the uninterrupted run had at that step and grows the same modules afterwards.
"""

from __future__ import annotations

from typing import Any, Optional

from effitrain.engine.events import Hook
from effitrain.peft.tri_adapt import (active_parameters, cores, modules_to_grow, orthogonal_penalty,
                                      select_growth)


class TriAdaptGrowth(Hook):
    name = "tri_adapt_lora"

    def __init__(self, warmup: int, interval: int, growth: str, budget: Optional[int], reference_rank: int,
                 orth_reg_weight: float) -> None:
        self.warmup, self.interval, self.growth = warmup, interval, growth
        self.budget_setting, self.reference_rank = budget, reference_rank
        self.orth_reg_weight = orth_reg_weight
        self.ranks: dict[str, int] = {}
        self.pre_norm: dict[str, float] = {}
        self.log: list[dict[str, Any]] = []  # one row per allocation: step, k, threshold, grown modules
        self._cores: dict[str, Any] = {}
        self.budget = 0
        self.total_steps = 0
        self._penalty: Any = None

    # -- events -----------------------------------------------------------------------------------------------
    def on_fit_start(self, state: Any) -> None:
        self._cores = {name: core for name, _, core in cores(state.model)}
        if not self._cores:
            raise RuntimeError("method tri_adapt_lora: the model has no TriAdaptLoRA modules; train it with "
                               "peft=tri_adapt_lora")
        self.total_steps = int(state.spec.train.max_steps)
        # the authors' default budget: the reference (average) rank for every module
        self.budget = self.budget_setting or self.reference_rank * len(self._cores)
        if self.ranks:  # restored before fit_start: re-apply the saved ranks
            self._apply()
        else:
            self.ranks = {name: core.rank for name, core in self._cores.items()}
            # the authors score once at initialisation, so the first allocation sees the change since then
            self.pre_norm = {name: core.normalized_norm() for name, core in self._cores.items()}
        self._report(state)

    def on_after_forward(self, state: Any) -> None:
        if self.orth_reg_weight > 0:  # in the logged training loss too (as peft's AdaLoRA adds its own); eval is plain
            penalty = orthogonal_penalty(state.model)
            state.loss = state.loss + self.orth_reg_weight * penalty.to(state.loss.dtype)
            self._penalty = penalty.detach()  # read (a host sync) only on log lines

    def on_step_end(self, state: Any) -> None:
        self._grow(state.step)
        train = state.spec.train
        if state.step % train.log_every == 0 or state.step == train.max_steps:
            self._report(state)  # on every log line (the engine clears its extra metrics after each one)

    def _grow(self, step: int) -> None:
        if sum(self.ranks.values()) >= self.budget or step <= self.warmup or step % self.interval:
            return
        scores = {}
        for name, core in self._cores.items():
            norm = core.normalized_norm()
            scores[name] = norm - self.pre_norm[name]
            self.pre_norm[name] = norm
        total = sum(self.ranks.values())
        k = modules_to_grow(step, self.total_steps, self.warmup, self.growth, self.budget, total, len(scores))
        first = next(iter(self._cores.values()))
        grown = select_growth(scores, k, self.ranks, first.max_rank, first.add_rank, room=self.budget - total)
        for name in grown:
            self.ranks[name] += first.add_rank
        self._apply()
        self.log.append({"step": step, "k": k, "threshold": sorted(scores.values(), reverse=True)[k - 1],
                         "grown": grown, "total_rank": sum(self.ranks.values())})

    # -- state ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"ranks": dict(self.ranks), "pre_norm": dict(self.pre_norm), "log": list(self.log)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ranks = {k: int(v) for k, v in state.get("ranks", {}).items()}
        self.pre_norm = {k: float(v) for k, v in state.get("pre_norm", {}).items()}
        self.log = list(state.get("log", []))
        if self._cores:  # restored after fit_start
            self._apply()

    # -- helpers ----------------------------------------------------------------------------------------------
    def _apply(self) -> None:
        for name, core in self._cores.items():
            core.rank = self.ranks[name]

    def _report(self, state: Any) -> None:
        state.metrics["tri_adapt/total_rank"] = float(sum(self.ranks.values()))
        state.metrics["tri_adapt/active_params"] = float(active_parameters(state.model))
        if self._penalty is not None:
            state.metrics["tri_adapt/orth_penalty"] = float(self._penalty)


def build_tri_adapt_growth(params) -> TriAdaptGrowth:
    return TriAdaptGrowth(warmup=params.warmup, interval=params.interval, growth=params.growth,
                          budget=params.budget, reference_rank=params.reference_rank,
                          orth_reg_weight=params.orth_reg_weight)
