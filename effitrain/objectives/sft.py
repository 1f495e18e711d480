"""``objective: sft``: supervised fine-tuning on conversations, the next-token loss on the assistant tokens only.

The chat rows (:mod:`effitrain.data.chat`) already carry ``labels = -100`` on every system, user and role-header
token and on the padding, and ``position_ids`` that restart at each packed conversation; the loss is the mean
next-token cross-entropy over the labelled positions, i.e. over the assistant tokens of the micro-batch (Tülu 3's
"mean" reduction; its "sum" reduction is not offered yet).  Position t predicts label t + 1, so the last token of one
packed conversation would predict the first of the next; that first token is a role header whose label is -100,
so no loss crosses a boundary.

Per-token weights: a method hook may set ``batch["token_weights"]`` (:mod:`effitrain.objectives.token_weights`), a
``[B, S]`` tensor aligned with ``labels`` (the weight of the token at label position ``s``) or a callable that maps
the trained-token mask ``[B, S]`` to one; the loss is then ``sum_s w_s l_s`` over the labelled positions, the
weights being the whole normalisation (the default, without them, is ``w_s = 1 / (labelled tokens)``).
"""

from __future__ import annotations

from typing import Any

import torch

from effitrain.objectives.common import IGNORE_INDEX, TOKEN_WEIGHTS, mean_token_loss, model_inputs, token_losses
from effitrain.objectives.token_weights import checked, weighted_sum


def weighted_token_loss(logits: torch.Tensor, labels: torch.Tensor, weights: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum_s w_s l_s`` over the labelled positions, with ``weights`` ``[B, S]`` aligned with ``labels`` (or a
    callable of their trained-token mask), and the unweighted mean token loss (a metric)."""
    labelled = labels != IGNORE_INDEX
    if callable(weights):
        weights = weights(labelled)
    weights = checked(weights, tuple(labels.shape), f"batch['{TOKEN_WEIGHTS}']", labels.device)
    losses, mask = token_losses(logits, labels)  # position t scores label t + 1: the weight of label position t + 1
    unweighted = (losses * mask).sum() / mask.sum().clamp(min=1)
    return weighted_sum(losses, weights[:, 1:], mask), unweighted.detach()


class SFT:
    def __call__(self, model: Any, batch: dict[str, Any], state: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = model(**model_inputs(batch))
        trained = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        metrics = {"assistant_tokens": trained.detach().float()}
        weights = batch.get(TOKEN_WEIGHTS)
        if weights is None:
            loss = mean_token_loss(out.logits, batch["labels"])
        else:
            loss, metrics["unweighted_loss"] = weighted_token_loss(out.logits, batch["labels"], weights)
        return loss, metrics


def build(params: Any, **context: Any) -> SFT:
    return SFT()
