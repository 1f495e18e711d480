"""``objective: lssd``: logit-swap self-distillation, the format-alignment loss of Mix-CPT (Jiang et al., "Mix-CPT:
A Domain Adaptation Framework via Decoupling Knowledge Learning and Format Alignment", 2407.10804, section 3.3).

At every labelled (assistant) position, with ``z`` the model's logits and ``g`` the gold next token:

    z'        = z with z[g] and z[top] exchanged, top = argmax z      (z' = z when g is already the top token)
    target    = softmax(z'), detached: the model's own distribution, except that the gold token takes the top
                logit and the previous top token takes the gold one
    loss_t    = KL(target || softmax(z)) = sum_k target_k (log target_k - log softmax(z)_k)

averaged over the labelled tokens of the micro-batch.  Because a swap keeps the multiset of logits, the softmax's
normaliser is unchanged: ``target_k = p_k`` for every token but ``g`` and ``top``, so the gradient with respect to
the logits, ``p - target``, is zero everywhere except ``p_g - p_top`` (< 0: the gold logit goes up) and
``p_top - p_g`` (the old top goes down).  The model learns to put the gold token first -- the format -- while the
rest of its distribution, where its knowledge lives, is the target itself; a plain cross-entropy instead pushes
all mass onto the gold token and moves every other logit.  Where the gold token is already the top one the target
is the model's own distribution and the position contributes neither loss nor gradient.
"""

from __future__ import annotations

from typing import Any

import torch

from effitrain.objectives.common import IGNORE_INDEX, model_inputs


def swapped_logits(logits: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """``logits`` ``[..., V]`` with the gold token's logit and the top logit exchanged at every position (gold
    ``[...]``); positions whose gold is already the top are returned unchanged."""
    top = logits.argmax(dim=-1, keepdim=True)
    gold = gold.unsqueeze(-1)
    top_value, gold_value = logits.gather(-1, top), logits.gather(-1, gold)
    return logits.scatter(-1, top, gold_value).scatter(-1, gold, top_value)


def lssd_token_losses(logits: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """``[...]``: KL(softmax(swapped logits) || softmax(logits)) per position, the target detached."""
    logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    target_logp = torch.log_softmax(swapped_logits(logits.detach(), gold), dim=-1)
    return (target_logp.exp() * (target_logp - logp)).sum(-1)


class LSSD:
    def __call__(self, model: Any, batch: dict[str, Any], state: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = model(**{k: v for k, v in model_inputs(batch).items() if k != "labels"})
        logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]  # position t predicts label t + 1
        mask = labels != IGNORE_INDEX
        gold = labels.clamp(min=0)
        losses = lssd_token_losses(logits, gold)
        count = mask.sum().clamp(min=1)
        loss = (losses * mask).sum() / count
        with torch.no_grad():
            top_is_gold = (logits.argmax(-1) == gold) & mask
            ce = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), gold, reduction="none")
        return loss, {"assistant_tokens": mask.sum().detach().float(),
                      "lssd_gold_top": top_is_gold.sum().float() / count,   # share of positions already aligned
                      "token_ce": (ce * mask).sum() / count}                 # the plain SFT loss, for comparison


def build(params: Any, **context: Any) -> LSSD:
    return LSSD()
