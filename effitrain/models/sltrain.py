"""SLTrain (Han et al., 2406.02214): pre-train linear layers as W = (alpha/r)·B·A + S, with S sparse on a fixed
random support (a share ``sparsity`` of the entries, drawn uniformly once) - parameter and optimizer memory scale
with r·(m+n) + delta·m·n instead of m·n, while the sum stays full-rank.

It is a ``peft``-group transform rather than a ``fit_start`` hook because it replaces parameters: the optimizer is
built after the peft block, so it sees the factors and sparse values, never the dense weights.  The final model is
exported dense (:func:`merge_sltrain`), so it loads into the stock `transformers` class.

W is composed in each forward pass (one transient m x n tensor per layer while it runs); the persistent parameters,
gradients and optimizer state are the factored ones, which is where SLTrain's saving is.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from effitrain.optim.param_groups import module_matches
from effitrain.models.replace import fold_to_linears, set_module

log = logging.getLogger("effitrain")


class SLTrainLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, *, rank: int, sparsity: float, alpha: float,
                 bias: bool, generator: torch.Generator, device=None, dtype=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        kw = {"device": device, "dtype": dtype}
        self.A = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.B = nn.Parameter(torch.empty(out_features, rank, **kw))
        nnz = max(1, int(round(sparsity * in_features * out_features)))
        # the support is fixed for the whole run (SLTrain's point: no pruning/regrowth), saved as a buffer
        support = torch.randperm(in_features * out_features, generator=generator)[:nnz].sort().values
        self.register_buffer("sparse_index", support.to(device), persistent=True)
        self.sparse_values = nn.Parameter(torch.empty(nnz, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        # As in the authors' SpLoRaLinear: A Kaiming-uniform, B zero (so W starts as S alone and B·A grows from
        # zero), sparse values uniform in +-1/sqrt(in_features), the bound of a dense nn.Linear init
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        nn.init.zeros_(self.B)
        bound = 1 / math.sqrt(in_features)
        with torch.no_grad():
            self.sparse_values.uniform_(-bound, bound, generator=generator)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kw) -> "SLTrainLinear":
        p = linear.weight
        return cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device=p.device,
                   dtype=p.dtype, **kw)

    def dense_weight(self) -> torch.Tensor:
        w = (self.B @ self.A) * self.scaling
        return w.reshape(-1).index_add(0, self.sparse_index, self.sparse_values).reshape(self.out_features,
                                                                                         self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight(), self.bias)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, "
                f"nnz={self.sparse_values.numel()}, alpha={self.alpha}")


def apply_sltrain(model: nn.Module, *, rank: int, sparsity: float, alpha: float, target_modules, seed: int = 0) -> int:
    generator = torch.Generator().manual_seed(seed)
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and module_matches(n, target_modules)]
    if not targets:
        from effitrain.registry import ConfigError
        raise ConfigError(f"peft.target_modules: {list(target_modules)} match no nn.Linear of {type(model).__name__}")
    replaced = 0
    for name, linear in targets:
        if rank >= min(linear.in_features, linear.out_features):
            # a rank-r factor of a matrix with a side <= r saves nothing: keep it dense (e.g. narrow GQA k/v
            # projections of a small model), and say so once per layer
            log.warning("sltrain: keeping '%s' dense, rank %d is not below min(in, out) = %d", name, rank,
                        min(linear.in_features, linear.out_features))
            continue
        set_module(model, name, SLTrainLinear.from_linear(linear, rank=rank, sparsity=sparsity, alpha=alpha,
                                                        generator=generator))
        replaced += 1
    if not replaced:
        from effitrain.registry import ConfigError
        raise ConfigError(f"peft.rank: {rank} is not below the smaller side of any targeted layer; lower it")
    return replaced


def build_sltrain(params, model: nn.Module) -> nn.Module:
    apply_sltrain(model, rank=params.rank, sparsity=params.sparsity, alpha=params.alpha,
                  target_modules=params.target_modules, seed=params.seed)
    return model


def has_sltrain(model: nn.Module) -> bool:
    return any(isinstance(m, SLTrainLinear) for m in model.modules())


def merge_sltrain(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in which every SLTrainLinear is the equivalent dense nn.Linear."""
    return fold_to_linears(model, SLTrainLinear, SLTrainLinear.dense_weight)
