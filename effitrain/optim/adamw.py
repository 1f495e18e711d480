"""AdamW with the usual split: no weight decay on biases, norms and embeddings of size < 2 dimensions."""

from __future__ import annotations

import torch


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two parameter groups: matrices decay, vectors (biases, norm scales) do not."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_adamw(params, model: torch.nn.Module, *, max_steps=None) -> torch.optim.Optimizer:
    from effitrain.optim.per_layer import maybe_per_layer
    return maybe_per_layer(torch.optim.AdamW(decay_groups(model, params.weight_decay), lr=params.lr,
                                             betas=(params.beta1, params.beta2), eps=params.eps,
                                             fused=True if params.fused else None), params)
