"""GaLore: AdamW whose moments live in a rank-r subspace of each targeted weight's gradient (Zhao et al., 2403.03507).

For a targeted m x n weight with gradient G, one step is::

    if refresh step:  P <- projector.choose(G)           (every update_proj_gap steps)
    g   = project(G)                                       (m x r or r x n)
    g   = projector.precondition(g)                        (Natural GaLore only)
    m,v = Adam moments of g                                (stored in the projected shape, optionally 8-bit)
    W  <- W - lr * scale * project_back(m_hat / (sqrt(v_hat) + eps)) - lr * wd * W

Every other trainable parameter (embeddings, head, norms, untargeted or too-small matrices) gets a plain AdamW
update in the same optimizer, so one ``torch.optim.Optimizer`` covers the model, as the engine contract asks.
The projector strategy (SVD, natural-gradient, DCT) is the only thing that differs between the three registered
names; see :mod:`effitrain.optim.projectors`.
"""

from __future__ import annotations

import math

import torch

from effitrain.optim.lowbit import moment_slots
from effitrain.optim.per_layer import maybe_per_layer
from effitrain.optim.param_groups import decay_split, require_targets, split_targeted
from effitrain.optim.projectors import Projector, make_projector


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW with per-group optional low-rank projection.

    A param group with ``"galore": True`` projects its 2-D parameters with ``projector`` (parameters where the rank
    is not below the smaller side get a dense update); other groups are plain AdamW.
    """

    def __init__(self, params, projector: Projector, *, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, state_bits: int = 32) -> None:
        if state_bits not in (8, 32):
            raise ValueError(f"state_bits must be 8 or 32, got {state_bits}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, galore=False)
        super().__init__(params, defaults)
        self.projector = projector
        self.state_bits = state_bits
        self._m, self._v = moment_slots(state_bits)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("GaLoreAdamW does not support sparse gradients")
                state = self.state[p]
                projected = group["galore"] and self.projector.applies_to(p.shape)
                step = int(state["step"]) + 1 if "step" in state else 1
                state["step"] = torch.tensor(float(step))

                if projected:
                    grad32 = grad.float()
                    if self.projector.needs_refresh(state, step):
                        rotation = self.projector.refresh(grad32, state, step)
                        if rotation is not None and self._has_moments(state):
                            self._rotate(state, rotation, self.projector.right_side(p.shape))
                    g = self.projector.precondition(self.projector.project(grad32, state), state)
                else:
                    g = grad.float()

                if not self._has_moments(state):
                    self._m.init(state, g.shape, g.device)
                    self._v.init(state, g.shape, g.device)
                exp_avg, exp_avg_sq = self._m.load(state), self._v.load(state)
                exp_avg.lerp_(g, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                self._m.store(state, exp_avg)
                self._v.store(state, exp_avg_sq)

                bias1 = 1 - beta1 ** step
                bias2 = 1 - beta2 ** step
                if projected and not self.projector.eps_on_bias_corrected:
                    # GaLore's AdamW: lr·sqrt(bias2)/bias1 · m / (sqrt(v) + eps)
                    update = exp_avg.mul(math.sqrt(bias2) / bias1) / exp_avg_sq.sqrt().add_(group["eps"])
                else:
                    update = (exp_avg / bias1) / ((exp_avg_sq / bias2).sqrt_().add_(group["eps"]))
                if projected:
                    update = self.projector.project_back(update, state, p.shape)  # includes the GaLore scale

                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-group["lr"])
        return loss

    def _has_moments(self, state: dict) -> bool:
        return self._m.key in state or f"{self._m.key}_q" in state

    def _rotate(self, state: dict, rotation: torch.Tensor, right: bool) -> None:
        """Carry the moments into a new subspace (DCT projector): m <- m R, v <- |v R| (2505.17967, Alg. 1)."""
        m = Projector.rotate(self._m.load(state), rotation, right)
        v = Projector.rotate(self._v.load(state), rotation, right).abs_()
        self._m.store(state, m)
        self._v.store(state, v)

    def projected_parameters(self) -> list[torch.nn.Parameter]:
        return [p for g in self.param_groups if g["galore"] for p in g["params"] if self.projector.applies_to(p.shape)]


def build_galore(params, model: torch.nn.Module, *, max_steps=None) -> GaLoreAdamW:
    projector = make_projector(params.projector, params, max_steps)
    targeted, rest = split_targeted(model, params.target_modules)
    require_targets(targeted, params.target_modules, model, "optimizer")
    decay, no_decay = decay_split(rest)
    groups = [{"params": [p for _, p in targeted], "galore": True, "weight_decay": params.weight_decay},
              {"params": decay, "weight_decay": params.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return maybe_per_layer(GaLoreAdamW([g for g in groups if g["params"]], projector, lr=params.lr,
                                       betas=(params.beta1, params.beta2), eps=params.eps,
                                       weight_decay=params.weight_decay, state_bits=params.state_bits), params)
