"""Monarch matrices (Dao et al., "Monarch: Expressive Structured Matrices for Efficient and Accurate Training",
ICML 2022, arXiv 2204.00595): a linear layer as a product of two block-diagonal matrices with fixed permutations.

The layer (the factorisation of the authors' ``MonarchLinear`` in HazyResearch/fly)
-------------------------------------------------------------------------------------
``k`` blocks; the input is zero-padded to ``k·p`` features (``p = ceil(in/k)``), the output is computed at ``k·s``
features (``s = ceil(out/k)``) and cut to ``out``; ``q = min(p, s)`` is the inner block size.

1. ``w1`` (``[k, q, p]``): block ``i`` maps input features ``i·p .. i·p+p-1`` to inner features ``i·q + j``.
2. The permutation: the ``k·q`` inner features are read as a ``[q, k]`` grid (row-major) and transposed, so block
   ``b`` of the second factor receives the inner features ``r·k + b``, ``r = 0..q-1`` (a stride-``k`` gather).
3. ``w2`` (``[k, s, q]``): block ``b`` maps those ``q`` features to its ``s`` outputs ``t``, written at output
   position ``t·k + b`` (the second permutation).

Hence, entry-wise, with ``i·q + j = r·k + b``::

    M[t·k + b, i·p + c] = sum over r of  w2[b, t, r] · w1[i, j, c]

Parameters ``k·q·(p + s)`` instead of ``in·out``; forward FLOPs ``2·k·q·(p + s)`` per token, so the 6N training-FLOPs
rule (effitrain/engine/metrics.py) stays true for a model of Monarch layers.

Dense → Monarch projection
--------------------------
Every ``(b, i)`` pair owns the ``s × p`` sub-matrix ``M[t·k + b, i·p + c]`` and a disjoint set of factor entries: the
columns ``w2[b, :, r]`` and rows ``w1[i, j, :]`` for the ``r`` with ``r·k + b`` inside block ``i``'s inner range.  The
sub-matrix is a sum of that many rank-1 terms, so the best Monarch approximation of a dense matrix in Frobenius norm
is, block by block, its truncated SVD at that rank (Eckart–Young); the paper's Theorem (rank-1 blocks when
``k = sqrt(n)``) is the special case of one ``r`` per block.  :func:`project_dense` does exactly this; the projection
of a Monarch matrix is exact.

Export: :func:`fold_monarch` replaces every Monarch layer by an ``nn.Linear`` holding its materialised matrix (the
same function), so a trained model saves as a stock ``transformers`` model.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from effitrain.linalg import svd
from effitrain.models.replace import fold_to_linears, replace_linears
from effitrain.registry import ConfigError


class MonarchLinear(nn.Module):
    """``y = M x + bias`` with ``M`` a Monarch matrix of ``nblocks`` blocks (module docstring)."""

    def __init__(self, in_features: int, out_features: int, nblocks: int, bias: bool = True,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        if nblocks < 1 or nblocks > min(in_features, out_features):
            raise ConfigError(f"peft.nblocks: {nblocks} is outside [1, {min(in_features, out_features)}] for a "
                              f"{in_features}x{out_features} layer")
        self.in_features, self.out_features, self.nblocks = in_features, out_features, nblocks
        self.in_block = math.ceil(in_features / nblocks)      # p
        self.out_block = math.ceil(out_features / nblocks)    # s
        self.inner_block = min(self.in_block, self.out_block)  # q
        k, p, q, s = nblocks, self.in_block, self.inner_block, self.out_block
        factory = {"device": device, "dtype": dtype}
        self.blkdiag1 = nn.Parameter(torch.empty(k, q, p, **factory))
        self.blkdiag2 = nn.Parameter(torch.empty(k, s, q, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # the authors' initialisation: each block as nn.Linear's default (Kaiming-uniform, a = sqrt(5)) on its own
        # fan-in, so the product has the scale of a dense layer
        for blocks in (self.blkdiag1, self.blkdiag2):
            bound = 1.0 / math.sqrt(blocks.shape[-1])
            nn.init.uniform_(blocks, -bound, bound)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, p, q, s = self.nblocks, self.in_block, self.inner_block, self.out_block
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        if x.shape[-1] < k * p:
            x = nn.functional.pad(x, (0, k * p - x.shape[-1]))
        # first factor, block i: [N, k, p] -> [N, k, q]
        h = torch.einsum("nkp,kqp->nkq", x.reshape(-1, k, p), self.blkdiag1)
        # permutation: inner feature i*q + j read as (r, b) with r*k + b, block b gets features r*k + b
        h = h.reshape(-1, q, k).transpose(1, 2)                      # [N, k (=b), q (=r)]
        # second factor, block b: [N, k, q] -> [N, k, s]; output t of block b at position t*k + b
        y = torch.einsum("nbr,bsr->nsb", h, self.blkdiag2).reshape(-1, s * k)
        y = y[:, :self.out_features]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """The ``[out, in]`` matrix this layer applies (bias excluded)."""
        k, p = self.nblocks, self.in_block
        eye = torch.eye(k * p, dtype=self.blkdiag1.dtype, device=self.blkdiag1.device)[:self.in_features]
        bias, self.bias = self.bias, None
        try:
            return self.forward(eye).T.contiguous()
        finally:
            self.bias = bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, nblocks={self.nblocks}, "
                f"blocks=({self.inner_block}x{self.in_block}, {self.out_block}x{self.inner_block}), "
                f"bias={self.bias is not None}")


def _block_terms(k: int, q: int, b: int, i: int) -> list[tuple[int, int]]:
    """The ``(r, j)`` pairs that connect output block ``b`` to input block ``i``: ``i·q + j = r·k + b``."""
    return [(r, r * k + b - i * q) for r in range(q) if 0 <= r * k + b - i * q < q]


@torch.no_grad()
def project_dense(weight: torch.Tensor, nblocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The Monarch factors ``(blkdiag1, blkdiag2)`` closest to ``weight`` (``[out, in]``) in Frobenius norm: per
    ``(b, i)`` block, the truncated SVD at the block's rank (module docstring)."""
    out_f, in_f = weight.shape
    k = nblocks
    p, s = math.ceil(in_f / k), math.ceil(out_f / k)
    q = min(p, s)
    padded = torch.zeros(k * s, k * p, dtype=torch.float64, device=weight.device)
    padded[:out_f, :in_f] = weight.to(torch.float64)
    w1 = torch.zeros(k, q, p, dtype=torch.float64, device=weight.device)
    w2 = torch.zeros(k, s, q, dtype=torch.float64, device=weight.device)
    rows = padded.reshape(s, k, k * p)        # [t, b, column]
    for b in range(k):
        for i in range(k):
            terms = _block_terms(k, q, b, i)
            if not terms:
                continue
            block = rows[:, b, i * p:(i + 1) * p]           # [s, p]
            u, sv, vh = svd(block)
            for n, (r, j) in enumerate(terms):
                if n >= len(sv):
                    break
                root = sv[n].sqrt()
                w2[b, :, r] = u[:, n] * root
                w1[i, j, :] = vh[n, :] * root
    return w1.to(weight.dtype), w2.to(weight.dtype)


def monarch_from_linear(linear: nn.Linear, nblocks: int, *, project: bool) -> MonarchLinear:
    layer = MonarchLinear(linear.in_features, linear.out_features, nblocks, bias=linear.bias is not None,
                          device=linear.weight.device, dtype=linear.weight.dtype)
    if project:
        w1, w2 = project_dense(linear.weight.detach(), nblocks)
        with torch.no_grad():
            layer.blkdiag1.copy_(w1)
            layer.blkdiag2.copy_(w2)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
    return layer


def apply_monarch(model: nn.Module, *, nblocks: int, target_modules: list[str], init: str) -> int:
    """Replace every matching ``nn.Linear`` (never the LM head) by a :class:`MonarchLinear`; ``init: project`` starts
    from the dense weights' projection, ``random`` from the authors' initialisation.  Returns the layer count."""
    return replace_linears(model, target_modules,
                           lambda linear: monarch_from_linear(linear, nblocks, project=init == "project"))


def build_monarch(params: Any, model: nn.Module) -> nn.Module:
    apply_monarch(model, nblocks=params.nblocks, target_modules=list(params.target_modules), init=params.init)
    return model


def has_monarch(model: nn.Module) -> bool:
    return any(isinstance(m, MonarchLinear) for m in model.modules())


def fold_monarch(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every Monarch layer replaced by the ``nn.Linear`` of its materialised matrix."""
    return fold_to_linears(model, MonarchLinear, lambda layer: layer.dense_weight())
