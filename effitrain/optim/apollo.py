"""APOLLO and APOLLO-Mini (Zhu et al., 2412.05270), written from the paper and the authors' ``apollo_torch``.

For a targeted m x n weight with raw gradient G, one step is::

    if refresh step:  P <- Gaussian / sqrt(r), a fresh seed each time   (every update_proj_gap steps)
    R   = G Pᵀ (m >= n: P is r x n, R is m x r)   or   Pᵀ G (m < n: P is m x r, R is r x n)
    m,v = Adam moments of R                                  (the only optimizer state: r·max(m, n) each)
    N   = m / (sqrt(v) + eps)                                 (Adam's update, in the projected space)
    s   = ||N||_c / (||R||_c + 1e-8)    per channel c (a row of an m >= n matrix, a column otherwise), or one
                                        scalar over the whole tensor for APOLLO-Mini (scale_type: tensor)
    U   = G * s                                               (the raw, full-rank gradient, rescaled)
    U  *= sqrt(alpha)                                         (once; before the limiter if scale_front)
    U  /= max(||U|| / ||U_prev||, 1.01) / 1.01                (norm-growth limiter, Fira 2410.01623)
    W  <- W - lr·sqrt(1 - beta2^t)/(1 - beta1^t) · U - lr·wd·W

The update is G rescaled channel-wise, so it is as full-rank as G: the rank-r projection only estimates the
scaling factors.  (pytorch-optimizer's ``APOLLO`` projects the Adam update back through P, which confines every
update to the r-dimensional subspace, and applies the scale twice; that is a different method.)

Every other trainable parameter (embeddings, norms, untargeted weights) gets Adam with the same step-size bias
correction, as in the authors' optimizer.  State holds only tensors (projection matrix and its seed included), so
checkpoints load with ``torch.load(weights_only=True)`` and a resumed run draws the same projections.
"""

from __future__ import annotations

import math

import torch

from effitrain.optim.param_groups import decay_split, require_targets, split_targeted
from effitrain.optim.per_layer import maybe_per_layer
from effitrain.optim.projectors import refresh_gap

_SEED_STRIDE = 1_000_003  # seed of refresh k of parameter i: base + i·stride + k (distinct per parameter/refresh)


def random_projection(shape: tuple[int, int], rank: int, seed: int, device) -> torch.Tensor:
    """Gaussian entries with variance 1/r, reproducible from ``seed`` (drawn on the CPU, so on any device)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float32) / math.sqrt(rank)).to(device=device)


class ApolloAdamW(torch.optim.Optimizer):
    """A param group with ``"apollo": True`` gets the APOLLO update on its 2-D parameters whose smaller side
    exceeds the rank; every other parameter gets Adam(W)."""

    def __init__(self, params, *, lr: float = 1e-2, betas=(0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, rank: int = 256, update_proj_gap: int = 200, scale: float = 1.0,
                 scale_type: str = "channel", scale_front: bool = False, norm_growth_limit: float = 1.01,
                 seed: int = 0) -> None:
        if scale_type not in ("channel", "tensor"):
            raise ValueError(f"scale_type must be 'channel' or 'tensor', got {scale_type!r}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, apollo=False)
        super().__init__(params, defaults)
        self.rank, self.update_proj_gap, self.scale = rank, update_proj_gap, scale
        self.scale_type, self.scale_front, self.norm_growth_limit = scale_type, scale_front, norm_growth_limit
        self.seed = seed
        self._index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}

    def applies_to(self, p: torch.Tensor) -> bool:
        return p.ndim == 2 and self.rank < min(p.shape)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._step_param(p, group)
        return loss

    def _step_param(self, p: torch.nn.Parameter, group: dict) -> None:
        beta1, beta2 = group["betas"]
        grad = p.grad.float()
        state = self.state[p]
        step = int(state["step"]) + 1 if "step" in state else 1
        state["step"] = torch.tensor(float(step))
        apollo = group["apollo"] and self.applies_to(p)
        tall = p.shape[0] >= p.shape[1] if p.ndim == 2 else True
        if apollo:
            if "proj" not in state or (step - 1) % self.update_proj_gap == 0:
                self._refresh(p, state, grad.device)
            proj = state["proj"]
            low = grad @ proj.transpose(0, 1) if tall else proj.transpose(0, 1) @ grad
        else:
            low = grad
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(low)
            state["exp_avg_sq"] = torch.zeros_like(low)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.mul_(beta1).add_(low, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(low, low, value=1 - beta2)
        step_size = group["lr"] * math.sqrt(1 - beta2 ** step) / (1 - beta1 ** step)
        update = exp_avg / (exp_avg_sq.sqrt() + group["eps"])
        if apollo:
            update = self._scaled_gradient(grad, low, update, state, tall)
        p.add_(update.to(p.dtype), alpha=-step_size)
        if group["weight_decay"]:
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])  # after the update, as the authors do

    def _refresh(self, p: torch.nn.Parameter, state: dict, device) -> None:
        count = int(state["proj_count"]) if "proj_count" in state else 0
        seed = self.seed + self._index[id(p)] * _SEED_STRIDE + count
        m, n = p.shape
        shape = (self.rank, n) if m >= n else (m, self.rank)
        state["proj"] = random_projection(shape, self.rank, seed, device)
        state["proj_count"] = torch.tensor(count + 1)

    def _scaled_gradient(self, grad, low, adam_low, state, tall: bool) -> torch.Tensor:
        if self.scale_type == "channel":
            dim = 1 if tall else 0   # the projected (rank-r) dimension: one factor per row (tall) or column
            factor = adam_low.norm(dim=dim, keepdim=True) / (low.norm(dim=dim, keepdim=True) + 1e-8)
        else:
            factor = adam_low.norm() / (low.norm() + 1e-8)
        scaled = grad * factor
        alpha = math.sqrt(self.scale)
        if self.scale_front:
            scaled.mul_(alpha)
        if self.norm_growth_limit:
            norm = scaled.norm()
            if "prev_norm" in state:
                limiter = torch.clamp(norm / (state["prev_norm"] + 1e-8), min=self.norm_growth_limit) \
                    / self.norm_growth_limit
                scaled.div_(limiter)
                state["prev_norm"] = norm / limiter
            else:
                state["prev_norm"] = norm
        if not self.scale_front:
            scaled.mul_(alpha)
        return scaled


def build_apollo(params, model: torch.nn.Module, *, max_steps=None) -> ApolloAdamW:
    targeted, rest = split_targeted(model, params.target_modules)
    require_targets(targeted, params.target_modules, model, "optimizer")
    decay, no_decay = decay_split(rest)
    groups = [{"params": [p for _, p in targeted], "apollo": True, "weight_decay": params.weight_decay},
              {"params": decay, "weight_decay": params.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return maybe_per_layer(ApolloAdamW([g for g in groups if g["params"]], lr=params.lr,
                                       betas=(params.beta1, params.beta2), eps=params.eps,
                                       weight_decay=params.weight_decay, rank=params.rank,
                                       update_proj_gap=refresh_gap(params, max_steps), scale=params.scale,
                                       scale_type=params.scale_type, scale_front=params.scale_front,
                                       seed=params.seed), params)
