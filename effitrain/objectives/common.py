"""Pieces that objectives share: which batch keys are model inputs, and per-token next-token losses."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from effitrain.data.rows import IGNORE_INDEX

#: batch keys that method hooks add for an objective; they are not arguments of the model's forward
EXAMPLE_WEIGHTS = "example_weights"
#: set by an objective that computes per-example losses (detached, ``[micro_batch_size]``), for ``after_forward`` hooks
#: such as ``effitrain.curriculum.loss_tracker``
EXAMPLE_LOSSES = "example_losses"
#: set by ``grpo``: the advantage of every sampled completion (detached, ``[micro_batch_size * group_size]``, the G
#: completions of a prompt together), for ``after_forward`` hooks such as ``effitrain.curriculum.dump``
COMPLETION_ADVANTAGES = "completion_advantages"
#: set by ``grpo``: each reward block's value for every sampled completion (``{reward name: [micro_batch_size *
#: group_size]}``, detached), for hooks and controllers that ask which prompts were solved (``mix_controller: relift``)
COMPLETION_REWARDS = "completion_rewards"
#: set by a method hook for a token-level objective: each trained token's coefficient in the loss (``sft``: ``[B, S]``
#: aligned with the labels, or a callable of their mask; ``grpo``: a callable ``(completions, mask) -> [N, C]``), see
#: :mod:`effitrain.objectives.token_weights`
TOKEN_WEIGHTS = "token_weights"
NON_MODEL_KEYS = (EXAMPLE_WEIGHTS, EXAMPLE_LOSSES, COMPLETION_ADVANTAGES, COMPLETION_REWARDS, TOKEN_WEIGHTS)


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch without the keys that are meant for the objective, not the model."""
    return {k: v for k, v in batch.items() if k not in NON_MODEL_KEYS}


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy at every position: ``(losses [B, S-1], mask [B, S-1])``.  Position t predicts
    label t+1, as in transformers' ``ForCausalLMLoss``; logits are upcast to float32 as it does."""
    shifted_logits = logits[:, :-1, :].float()
    shifted_labels = labels[:, 1:]
    mask = shifted_labels != IGNORE_INDEX
    losses = F.cross_entropy(shifted_logits.reshape(-1, shifted_logits.shape[-1]), shifted_labels.reshape(-1),
                             ignore_index=IGNORE_INDEX, reduction="none").view_as(shifted_labels)
    return losses, mask


def shifted_token_loss_sum(logits: torch.Tensor, shift_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed cross-entropy of ``logits`` against labels already shifted (position t scored against
    ``shift_labels[t]``), and the number of labelled positions: for a slice of a sequence, whose last position's
    label lies in the next slice."""
    losses = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), shift_labels.reshape(-1),
                             ignore_index=IGNORE_INDEX, reduction="sum")
    return losses, (shift_labels != IGNORE_INDEX).sum()


def mean_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The mean next-token loss over the batch's labelled positions (the model's own loss, recomputed)."""
    losses, mask = token_losses(logits, labels)
    return losses.sum() / mask.sum().clamp(min=1)


def router_z_loss(router_logits: Any) -> Any:
    """ST-MoE's router z-loss (Zoph et al., 2202.08906, eq. 5) of every MoE layer, summed over the layers as
    Megatron-LM adds each layer's term: ``mean over tokens of (logsumexp over experts of the router logits)^2``.
    It keeps the router logits small, so the softmax stays in a numerically stable range."""
    import torch

    return sum(torch.logsumexp(logits.float(), dim=-1).pow(2).mean() for logits in router_logits)
