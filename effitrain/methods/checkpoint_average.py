"""Weighted averaging of the last checkpoints into the final model (``methods: {checkpoint_average: {...}}``).

The method keeps one running average of the model's floating-point parameters (fp32, on the CPU) over ``count``
snapshots taken ``every`` optimizer steps, the last at ``train.max_steps``: snapshot ``k`` (1-based, oldest first) is
taken at the end of step ``max_steps - (count - k) * every``.  At the last snapshot the average replaces the model's
weights, so the final evaluation, the final checkpoint and ``final_model`` (what ``effitrain export`` and the eval
harness read) are the averaged model.

Weightings of the snapshots ``theta_1 .. theta_K`` (newest last):

* ``sma``: equal weights ``1/K``;
* ``ema``: ``avg_1 = theta_1``, ``avg_k = alpha theta_k + (1 - alpha) avg_(k-1)``: the newest weighs ``alpha``, the
  oldest ``(1 - alpha)^(K-1)``;
* ``wma``: weights proportional to ``k`` (linearly more weight on newer snapshots).

Each update is exact and incremental (no list of snapshots is kept), and the average with its count is the hook's
checkpoint state: a run resumed between two snapshots continues the same average.  Reusable by any recipe (a
WSM-style decay-free schedule, LAWA): it knows nothing of curricula.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from effitrain.engine.events import Hook


def snapshot_steps(max_steps: int, count: int, every: int) -> list[int]:
    """The steps after which snapshots are taken (those before step 1 are dropped in a run too short for all)."""
    return [s for s in (max_steps - (count - k) * every for k in range(1, count + 1)) if s >= 1]


def combine(avg: Optional[torch.Tensor], theta: torch.Tensor, k: int, weighting: str, alpha: float) -> torch.Tensor:
    """The average after adding snapshot ``k`` (1-based) ``theta`` to the average ``avg`` of snapshots 1..k-1."""
    theta = theta.detach().to("cpu", torch.float32)
    if avg is None or k == 1:
        return theta.clone()
    if weighting == "sma":
        return avg + (theta - avg) / k
    if weighting == "ema":
        return alpha * theta + (1.0 - alpha) * avg
    if weighting == "wma":  # sum of weights 1..k-1 is (k-1)k/2; adding weight k gives k(k+1)/2
        return (avg * ((k - 1) * k / 2) + theta * k) / (k * (k + 1) / 2)
    raise ValueError(f"unknown weighting {weighting!r}")


class CheckpointAverage(Hook):
    name = "checkpoint_average"

    def __init__(self, count: int, every: Optional[int], window: float, weighting: str, alpha: float) -> None:
        self.count = count
        self.every = every
        self.window = window
        self.weighting = weighting
        self.alpha = alpha
        self.average: dict[str, torch.Tensor] = {}
        self.taken: list[int] = []   # steps of the snapshots in the average

    def interval(self, max_steps: int) -> int:
        if self.every is not None:
            return self.every
        return max(1, round(self.window * max_steps / max(self.count - 1, 1)))

    def on_step_end(self, state: Any) -> None:
        max_steps = state.spec.train.max_steps
        if state.step not in snapshot_steps(max_steps, self.count, self.interval(max_steps)):
            return
        if state.step in self.taken:
            return
        k = len(self.taken) + 1
        with torch.no_grad():
            for name, p in state.model.named_parameters():
                if p.is_floating_point():
                    self.average[name] = combine(self.average.get(name), p, k, self.weighting, self.alpha)
        self.taken.append(state.step)
        state.metrics["checkpoint_average/snapshots"] = float(k)
        if state.step == max_steps:
            self.apply(state.model, getattr(getattr(state, "engine", None), "optimizer", None))

    def apply(self, model: Any, optimizer: Any = None) -> None:
        """Write the average into ``model``'s parameters (the final model becomes the averaged one).

        A DeepSpeed optimizer (ZeRO 1/2, bf16) keeps its own fp32 master copy, which the last checkpoint stores and
        ``effitrain export`` reads (``zero_to_fp32``): ``refresh_fp32_params`` copies the averaged weights into it."""
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in self.average:
                    p.copy_(self.average[name].to(device=p.device, dtype=p.dtype))
        if hasattr(optimizer, "refresh_fp32_params"):
            optimizer.refresh_fp32_params()

    def state_dict(self) -> dict[str, Any]:
        return {"taken": list(self.taken), "average": self.average}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.taken = [int(s) for s in state.get("taken", [])]
        self.average = dict(state.get("average", {}))


def build_checkpoint_average(params: Any) -> CheckpointAverage:
    return CheckpointAverage(params.count, params.every, params.window, params.weighting, params.alpha)
