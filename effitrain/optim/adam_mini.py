"""Adam-mini (Zhang et al., 2406.16793): one second-moment value per parameter block instead of one per weight.

Written from the paper and the authors' release (``adam_mini`` 1.1.1, github.com/zyushun/Adam-mini).  Blocks are
found from parameter names, as the authors do:

=====================  ==========================================  ==========================================
parameter              ``partition: v1.1`` (current release)       ``partition: v1.0`` (releases <= 1.0.4)
=====================  ==========================================  ==========================================
query, key             one v per attention head                    one v per attention head
value, attn output     one v per output neuron (row)               one v for the whole tensor
MLP                    one v per output neuron (row)               one v for the whole tensor
embedding, LM head     one v per token (row)                       Adam: one v per weight
norms, other tensors   one v for the whole tensor                  one v for the whole tensor
biases                 Adam: one v per weight                      (as "other": one v per tensor)
=====================  ==========================================  ==========================================

Per block B, with t the step: ``v_B <- beta2 v_B + (1 - beta2) mean_{i in B} g_i^2``,
``m <- beta1 m + (1 - beta1) g``, ``w <- w (1 - lr wd) - lr / (1 - beta1^t) · m / (sqrt(v_B / (1 - beta2^t)) + eps)``.
Norm scales and biases are not decayed; every other weight is (embeddings and head included), as in the release.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

EMBED = ("embed", "embd", "wte")
OUTPUT = ("lm_head", "output", "final_layer")
QUERY_KEY = ("k_proj", "q_proj", "wq", "wk", "query", "key")
VALUE = ("v_proj", "wv", "value")
ATTN_OUT = ("o_proj", "wo", "attn.proj")
MLP = ("feed_forward", "linear", "mlp")

#: block kinds: one v per weight / per attention head / per row (output neuron or token) / per tensor
ELEMENT, HEAD, ROW, TENSOR = "element", "head", "row", "tensor"


def _has(name: str, keys) -> bool:
    return any(k in name for k in keys)


def block_kind(name: str, p: torch.Tensor, head_dim: int, partition: Literal["v1.1", "v1.0"] = "v1.1") -> str:
    """The Adam-mini block kind of parameter ``name`` (lower-cased full name) under ``partition``."""
    name = name.lower()
    head_ok = p.ndim == 2 and p.shape[0] % head_dim == 0
    if partition == "v1.0":
        if _has(name, EMBED) or _has(name, ("lm_head.weight", "output.weight")):
            return ELEMENT
        if _has(name, ("k_proj.weight", "q_proj.weight", "wq.weight", "wk.weight")) and head_ok:
            return HEAD
        return TENSOR
    if "bias" in name:
        return ELEMENT
    if _has(name, QUERY_KEY) and head_ok:
        return HEAD
    if _has(name, EMBED + OUTPUT + VALUE + ATTN_OUT + MLP) and p.ndim == 2:
        return ROW
    return TENSOR


class AdamMini(torch.optim.Optimizer):
    """One param group per parameter (``name``, ``block`` and ``head_dim`` in the group, as in the release)."""

    def __init__(self, named_parameters, *, head_dim: int, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, partition: Literal["v1.1", "v1.0"] = "v1.1") -> None:
        if partition not in ("v1.1", "v1.0"):
            raise ValueError(f"partition must be 'v1.1' or 'v1.0', got {partition!r}")
        groups, seen = [], set()
        for name, p in named_parameters:
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            low = name.lower()
            decay = 0.0 if ("norm" in low or "bias" in low or p.ndim < 2) else weight_decay
            groups.append({"params": [p], "name": name, "block": block_kind(low, p, head_dim, partition),
                           "weight_decay": decay})
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.head_dim = head_dim
        self.partition = partition

    def _blocks(self, g: torch.Tensor, kind: str) -> torch.Tensor:
        """Mean of g^2 over each block, shaped to broadcast against the (viewed) gradient."""
        if kind == ELEMENT:
            return g * g
        if kind == HEAD:
            return (g * g).view(g.shape[0] // self.head_dim, -1).mean(dim=1, keepdim=True)
        if kind == ROW:
            return (g * g).mean(dim=1, keepdim=True)
        return (g * g).mean()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            p = group["params"][0]
            if p.grad is None:
                continue
            beta1, beta2 = group["betas"]
            kind = group["block"]
            g = p.grad.float()
            state = self.state[p]
            if "m" not in state:
                state["step"] = torch.tensor(0.0)
                state["m"] = torch.zeros_like(g)
                state["v"] = torch.zeros_like(self._blocks(g, kind))
            state["step"] += 1
            step = int(state["step"])
            state["v"].mul_(beta2).add_(self._blocks(g, kind), alpha=1 - beta2)
            state["m"].lerp_(g, 1 - beta1)
            if group["weight_decay"]:
                p.mul_(1 - group["lr"] * group["weight_decay"])
            h = (state["v"].sqrt() / math.sqrt(1 - beta2 ** step)).add_(group["eps"])
            m = state["m"]
            if kind == HEAD:
                update = (m.view(h.shape[0], -1) / h).view_as(m)
            else:
                update = m / h
            p.add_(update.to(p.dtype), alpha=-group["lr"] / (1 - beta1 ** step))
        return loss


def build_adam_mini(params, model: torch.nn.Module, *, max_steps=None) -> AdamMini:
    config = getattr(model, "config", None)
    hidden = getattr(config, "hidden_size", None)
    heads = getattr(config, "num_attention_heads", None)
    if hidden is None or heads is None:
        from effitrain.registry import ConfigError
        raise ConfigError("optimizer=adam_mini partitions query/key by attention head and needs "
                          "model.config.hidden_size and num_attention_heads; use optimizer=adamw for this model")
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    from effitrain.optim.per_layer import maybe_per_layer
    return maybe_per_layer(AdamMini(model.named_parameters(), head_dim=head_dim, lr=params.lr,
                                    betas=(params.beta1, params.beta2), eps=params.eps,
                                    weight_decay=params.weight_decay, partition=params.partition), params)
