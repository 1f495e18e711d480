"""``objective: weighted_causal_lm``: loss = sum_i w_i l_i / sum_i w_i over the micro-batch's examples.

``l_i`` is the mean next-token loss of example ``i`` (over its labelled positions).  The weights come from a method
hook, which sets ``state.batch["example_weights"]`` (a tensor of shape ``[micro_batch_size]``, >= 0, positive sum) in
its ``on_batch_start``, or a callable that maps the detached per-example losses ``[B]`` of this forward to such a
tensor (weights that depend on the current loss, as loss-based reweighting needs, without a second forward); the
loop builds a fresh batch dict per micro-batch, so weights never leak into the next one.
Without weights every example weighs ``default_weight`` (then the loss is the mean of the examples' losses, which
is the model's own loss when every example has the same number of labelled tokens, as packed rows do).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from effitrain.errors import RunFailed
from effitrain.objectives.common import EXAMPLE_LOSSES, EXAMPLE_WEIGHTS, model_inputs, token_losses


def example_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[B]``: each example's mean next-token loss over its labelled positions."""
    losses, mask = token_losses(logits, labels)
    return (losses * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


class WeightedCausalLM:
    def __init__(self, default_weight: Optional[float]) -> None:
        self.default_weight = default_weight

    def weights(self, batch: dict[str, Any], losses: torch.Tensor) -> torch.Tensor:
        n, device = losses.shape[0], losses.device
        weights = batch.get(EXAMPLE_WEIGHTS)
        if callable(weights):
            weights = weights(losses.detach())
        if weights is None:
            if self.default_weight is None:
                raise RunFailed(f"objective=weighted_causal_lm: this micro-batch has no batch['{EXAMPLE_WEIGHTS}'] "
                                f"and objective.default_weight is null; add the method that sets the weights at "
                                f"batch_start, or set objective.default_weight")
            return torch.full((n,), float(self.default_weight), device=device)
        weights = torch.as_tensor(weights, device=device, dtype=torch.float32)
        if weights.shape != (n,):
            raise RunFailed(f"objective=weighted_causal_lm: batch['{EXAMPLE_WEIGHTS}'] has shape "
                            f"{tuple(weights.shape)}, expected ({n},), one weight per example of the micro-batch")
        return weights

    def __call__(self, model: Any, batch: dict[str, Any], state: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = model(**model_inputs(batch))
        per_example = example_losses(out.logits, batch["labels"])
        weights = self.weights(batch, per_example)
        # sum w_i l_i / sum w_i.  The values are not checked here (that would be a host sync per micro-batch): weights
        # that sum to zero give a non-finite loss, which the non-finite guard reports and skips; keeping them >= 0 is
        # the supplying hook's contract
        loss = (weights * per_example).sum() / weights.sum()
        batch[EXAMPLE_LOSSES] = per_example.detach()  # for after_forward hooks (a per-example loss tracker)
        return loss, {"unweighted_loss": per_example.detach().mean()}


def build(params: Any, **context: Any) -> WeightedCausalLM:
    return WeightedCausalLM(params.default_weight)
