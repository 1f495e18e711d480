"""``objective: sft``: supervised fine-tuning on conversations, the next-token loss on the assistant tokens only.

The chat rows (:mod:`effitrain.data.chat`) already carry ``labels = -100`` on every system, user and role-header
token and on the padding, and ``position_ids`` that restart at each packed conversation; the loss is the mean
next-token cross-entropy over the labelled positions, i.e. over the assistant tokens of the micro-batch (Tülu 3's
"mean" reduction; its "sum" reduction is not offered yet).  Position t predicts label t + 1, so the last token of one
packed conversation would predict the first of the next; that first token is a role header whose label is -100,
so no loss crosses a boundary.
"""

from __future__ import annotations

from typing import Any

import torch

from effitrain.objectives.common import IGNORE_INDEX, mean_token_loss, model_inputs


class SFT:
    def __call__(self, model: Any, batch: dict[str, Any], state: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = model(**model_inputs(batch))
        loss = mean_token_loss(out.logits, batch["labels"])
        trained = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        return loss, {"assistant_tokens": trained.detach().float()}


def build(params: Any, **context: Any) -> SFT:
    return SFT()
