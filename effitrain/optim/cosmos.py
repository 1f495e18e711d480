"""COSMOS (Liu et al., 2502.17410): SOAP-style Adam in the leading eigensubspace of each hidden weight's gradient,
Muon on the rest of the gradient, AdamW on the embedding, head, norms and biases.

Written from the authors' release (lliu606/COSMOS, ``COSMOS_optim.py``, commit 61de180).  For a hidden m x n weight
W with gradient G and a rank r (at most n), one step is::

    M  <- beta1 M + G                                       (momentum, sum form)
    step 1:  P <- top-r eigenvectors of GᵀG;  S <- (1-beta2) PᵀGᵀG P
    else:    P' <- QR(beta2 P S + (1-beta2) GᵀG P);  T = PᵀP'
             S  <- beta2 Tᵀ S T + (1-beta2) (G P')ᵀ(G P');  P <- P'
    V  <- beta2 V + (1-beta2) (G P)²                         (m x r second moment, in the subspace)
    Ĝ  = (G + beta1 M) / (1 + beta1 c1),  c1 = (1 - beta1^t)/(1 - beta1)      (Nesterov, normalised)
    A  = [(Ĝ P) / (sqrt(V / (1 - beta2^t)) + eps)] Pᵀ        (Adam in the eigenbasis: SOAP's part)
    B  = sqrt(mn) · NS5(Ĝ - Ĝ P Pᵀ) / ||NS5(·)||            (Muon on the orthogonal complement)
    U  = A + gamma B
    W <- W (1 - lr wd) - lr · lr_ratio · sqrt(mn) · U / ||U||

so every hidden update has Frobenius norm lr·lr_ratio·sqrt(mn) (an RMS of lr·lr_ratio per entry).  S (r x r) and P
(n x r) are the EMA of GᵀG restricted to, and tracking, its leading eigensubspace (one power-iteration step per
step).  State per hidden weight: M (m x n), V (m x r), P (n x r), S (r x r).
"""

from __future__ import annotations

import math

import torch

from effitrain.linalg import svd
from effitrain.optim.muon import MatrixAndAdamW, adamw_groups, split_for_muon

#: the quintic Newton-Schulz coefficients of Jordan's Muon, which the authors' release uses (5 iterations)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz5(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """The authors' ``zeropower_via_newtonschulz5``: bf16, Frobenius-normalised, on the wide orientation."""
    a, b, c = NS_COEFFICIENTS
    x = g.bfloat16()
    x = x / (x.norm() + eps)
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        cubic = gram @ x
        x = a * x + b * cubic + c * gram @ cubic
    return (x.T if tall else x).to(g.dtype)


class COSMOS(torch.optim.Optimizer):
    """COSMOS's update for 2-D weights (the hidden ones: the embedding and head go to AdamW, see ``build_cosmos``)."""

    def __init__(self, params, *, lr: float, lr_ratio: float = 0.1, rank: int = 64, betas=(0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.0, gamma: float = 0.2) -> None:
        defaults = dict(lr=lr, lr_ratio=lr_ratio, rank=rank, betas=betas, eps=eps, weight_decay=weight_decay,
                        gamma=gamma)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"COSMOS steps 2-D weights only, got a parameter of shape {tuple(p.shape)}")

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
                self._update(p, p.grad.float(), group, beta1, beta2)
        return loss

    def _update(self, p: torch.nn.Parameter, g: torch.Tensor, group: dict, beta1: float, beta2: float) -> None:
        m, n = g.shape
        r = min(group["rank"], n)
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(g)
            state["exp_avg_sq"] = torch.zeros(m, r, dtype=g.dtype, device=g.device)
            state["subspace"] = torch.zeros(n, r, dtype=g.dtype, device=g.device)
            state["subspace_gram"] = torch.zeros(r, r, dtype=g.dtype, device=g.device)
        step = int(state["step"]) + 1
        state["step"] = torch.tensor(float(step))
        M, V, P, S = state["exp_avg"], state["exp_avg_sq"], state["subspace"], state["subspace_gram"]

        M.mul_(beta1).add_(g)
        if step == 1:
            u, _, _ = svd(g.T @ g)
            P_new = u[:, :r]
            gp = g @ P_new
            S_new = (gp.T @ gp) * (1 - beta2)
        else:
            P_new, _ = torch.linalg.qr(beta2 * (P @ S) + (1 - beta2) * (g.T @ (g @ P)), mode="reduced")
            T = P.T @ P_new
            gp = g @ P_new
            S_new = beta2 * (T.T @ S @ T) + (1 - beta2) * (gp.T @ gp)
        P.copy_(P_new)
        S.copy_(S_new)
        V.mul_(beta2).addcmul_(gp, gp, value=1 - beta2)

        c1 = (1 - beta1 ** step) / (1 - beta1)
        c2 = 1 - beta2 ** step
        g_hat = (g + beta1 * M) / (1 + beta1 * c1)
        eps = group["eps"]
        in_sub = g_hat @ P
        adam_part = (in_sub / ((V.sqrt() / math.sqrt(c2)).add_(eps))) @ P.T
        scale = math.sqrt(m * n)
        ortho = newton_schulz5(g_hat - in_sub @ P.T)
        update = adam_part + group["gamma"] * scale * ortho / (ortho.norm() + eps)
        if group["weight_decay"] > 0:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_((update / (update.norm() + eps)).to(p.dtype), alpha=-scale * group["lr_ratio"] * group["lr"])


def build_cosmos(params, model: torch.nn.Module, *, max_steps=None) -> MatrixAndAdamW:
    hidden, matrices, vectors = split_for_muon(model)
    cosmos = (COSMOS([{"params": hidden}], lr=params.lr, lr_ratio=params.lr_ratio, rank=params.rank,
                     betas=(params.beta1, params.beta2), eps=params.eps, weight_decay=params.weight_decay,
                     gamma=params.gamma) if hidden else None)
    return MatrixAndAdamW(cosmos, adamw_groups(matrices, vectors, lr=params.lr, weight_decay=params.weight_decay,
                                               betas=(params.beta1, params.beta2), eps=params.eps))
