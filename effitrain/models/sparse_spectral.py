"""Sparse Spectral Training (SST; Zhao et al., "Sparse Spectral Training and Inference on Euclidean and Hyperbolic
Neural Networks", arXiv 2405.15481): ``peft: sparse_spectral`` plus ``methods: sparse_spectral``.

Each targeted ``nn.Linear`` becomes ``W = U diag(S) V^T``, initialised from the SVD of its weight (exact at the
start: the layer computes what the dense one did).  Then, round after round:

* **all singular values** ``S`` are trained every step;
* **r singular-vector pairs** (``peft.rank``) are drawn per layer *without replacement with probability
  proportional to the singular values* (a multinomial draw, so strong directions are updated more often, weak ones
  are still explored), and only those columns of ``U`` and ``V`` are trainable during the round; every other column
  is a buffer the optimizer never sees;
* the sampled vectors get the paper's **enhanced gradient** (its section 4.2, proof in its appendix D): the gradient
  of ``W`` times the partner vector, *not* multiplied by ``sigma_i``, so that a direction with a small singular value
  is not also updated slowly (``peft.enhanced_gradient``);
* at the end of each round (``methods.sparse_spectral.interval`` steps) the trained vectors are written back and
  the whole matrix is **re-decomposed** by SVD, which restores ``U^T U = V^T V = I`` and keeps ``W``; the optimizer
  state of the layer's trainable factors is dropped (the re-decomposed vectors are new coordinates), and a fresh
  sample is drawn.

The draws come from generators seeded by (``peft.seed``, layer, round), so a resumed run draws what the
uninterrupted one drew.  The forward materialises ``W`` once per micro-batch and multiplies by it (cheaper than two
thin products once a micro-batch has more tokens than the layer has columns); the true FLOPs (dense matmul per
token, forming ``W`` per micro-batch, an SVD per round) are reported by the hook, not counted as 6N of the factors.
Export multiplies ``U diag(S) V^T`` out into a stock ``nn.Linear`` (exact up to float rounding).

The authors' repository (biomedical-cybernetics/sparse-spectral-training) could not be reached from here; this
follows the paper's description (docs/recipes/sparse_spectral.md says what that leaves open).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from effitrain.engine.events import Hook
from effitrain.linalg import svd
from effitrain.models.replace import fold_to_linears, replace_linears


def _generator(seed: int, layer: int, round_: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + layer * 10_007 + round_)


class SpectralLinear(nn.Module):
    """``y = x (U diag(S) V^T)^T + b`` with ``rank`` sampled columns of ``U`` and ``V`` trainable."""

    def __init__(self, linear: nn.Linear, *, rank: int, seed: int, index: int, enhanced_gradient: bool = True):
        super().__init__()
        weight = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.full_rank = min(self.in_features, self.out_features)
        if not 0 < rank <= self.full_rank:
            raise ValueError(f"rank {rank} is outside 1..{self.full_rank} for a {self.out_features}x"
                             f"{self.in_features} layer")
        self.rank, self.seed, self.index, self.enhanced_gradient = rank, seed, index, enhanced_gradient
        u, s, vh = svd(weight.float())
        dtype, device = weight.dtype, weight.device
        self.register_buffer("U", u.to(dtype))                       # out x k, columns: left singular vectors
        self.register_buffer("V", vh.T.contiguous().to(dtype))       # in x k, columns: right singular vectors
        self.S = nn.Parameter(s.to(dtype))                           # k singular values, all trained
        self.register_buffer("sampled", torch.zeros(rank, dtype=torch.long, device=device))
        self.U_sampled = nn.Parameter(torch.empty(self.out_features, rank, dtype=dtype, device=device))
        self.V_sampled = nn.Parameter(torch.empty(self.in_features, rank, dtype=dtype, device=device))
        self.bias = linear.bias
        for p in (self.S, self.U_sampled, self.V_sampled):
            p._effitrain_flops_excluded = True  # the hook reports the layer's true cost (dense W per token)
        if enhanced_gradient:
            self.U_sampled.register_hook(self._enhance)
            self.V_sampled.register_hook(self._enhance)
        self.rounds = 0
        self.load_sample(self.draw(0))

    # -- the sample ------------------------------------------------------------------------------------------------
    def draw(self, round_: int) -> torch.Tensor:
        """``rank`` indices drawn without replacement, with probability proportional to the singular values."""
        weights = self.S.detach().float().clamp(min=0).cpu()
        if not torch.any(weights > 0):
            weights = torch.ones_like(weights)
        picked = torch.multinomial(weights, self.rank, replacement=False,
                                   generator=_generator(self.seed, self.index, round_))
        return picked.sort().values.to(self.sampled.device)

    @torch.no_grad()
    def load_sample(self, indices: torch.Tensor) -> None:
        self.sampled.copy_(indices)
        self.U_sampled.copy_(self.U[:, indices])
        self.V_sampled.copy_(self.V[:, indices])

    @torch.no_grad()
    def write_back(self) -> None:
        """The trained sampled vectors into the full factors."""
        self.U[:, self.sampled] = self.U_sampled.to(self.U.dtype)
        self.V[:, self.sampled] = self.V_sampled.to(self.V.dtype)

    def _enhance(self, grad: torch.Tensor) -> torch.Tensor:
        # the gradient reaching U[:, i] through W = U diag(S) V^T carries a factor sigma_i; the paper drops it
        sigma = self.S.detach()[self.sampled].to(grad.dtype)
        return grad / sigma.clamp(min=torch.finfo(grad.dtype).tiny ** 0.5)

    # -- the matrix ------------------------------------------------------------------------------------------------
    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """U and V with the (trainable) sampled columns in place."""
        return (self.U.index_copy(1, self.sampled, self.U_sampled.to(self.U.dtype)),
                self.V.index_copy(1, self.sampled, self.V_sampled.to(self.V.dtype)))

    def dense_weight(self) -> torch.Tensor:
        u, v = self.factors()
        return (u * self.S.to(u.dtype)) @ v.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight().to(x.dtype), self.bias)

    @torch.no_grad()
    def redecompose(self) -> None:
        """End of a round: write back, re-SVD the whole matrix (orthonormal factors again, same W), draw anew."""
        self.write_back()
        u, s, vh = svd(self.dense_weight().float())
        self.U.copy_(u)
        self.V.copy_(vh.T)
        self.S.copy_(s)
        self.rounds += 1
        self.load_sample(self.draw(self.rounds))

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, full_rank={self.full_rank}, rank={self.rank}, "
                f"enhanced_gradient={self.enhanced_gradient}")


def apply_sparse_spectral(model: nn.Module, *, rank: int, target_modules: list[str], seed: int,
                          enhanced_gradient: bool = True) -> int:
    """Replace every matching ``nn.Linear`` (never the LM head) by a :class:`SpectralLinear`; returns the count."""
    from effitrain.registry import ConfigError

    counter = iter(range(10**9))

    def make(linear: nn.Linear) -> SpectralLinear:
        smaller = min(linear.in_features, linear.out_features)
        if rank > smaller:
            raise ConfigError(f"peft.rank: {rank} singular-vector pairs cannot be drawn from a {linear.out_features}x"
                              f"{linear.in_features} layer (rank {smaller}); lower peft.rank to at most {smaller} "
                              f"or narrow peft.target_modules")
        return SpectralLinear(linear, rank=rank, seed=seed, index=next(counter), enhanced_gradient=enhanced_gradient)

    return replace_linears(model, target_modules, make)


def build_sparse_spectral(params: Any, model: nn.Module) -> nn.Module:
    apply_sparse_spectral(model, rank=params.rank, target_modules=list(params.target_modules), seed=params.seed,
                          enhanced_gradient=params.enhanced_gradient)
    return model


def spectral_layers(model: nn.Module) -> list[SpectralLinear]:
    return [m for m in model.modules() if isinstance(m, SpectralLinear)]


def has_sparse_spectral(model: nn.Module) -> bool:
    return bool(spectral_layers(model))


def fold_sparse_spectral(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose spectral layers are the ``nn.Linear`` of ``U diag(S) V^T``."""
    return fold_to_linears(model, SpectralLinear, lambda layer: layer.dense_weight())


def svd_flops(m: int, n: int) -> float:
    """FLOPs of a thin SVD (U, S and V) of an m x n matrix by Golub-Reinsch, ``14 m n^2 + 8 n^3`` for m >= n (Golub &
    Van Loan, Matrix Computations, 4th ed., Fig. 8.6.1): an estimate, LAPACK's divide and conquer differs."""
    m, n = max(m, n), min(m, n)
    return 14.0 * m * n * n + 8.0 * n ** 3


class SparseSpectral(Hook):
    """Ends a round every ``interval`` optimizer steps in every spectral layer: write back, re-SVD, drop the layer's
    optimizer state, draw the next sample.  Checkpointed: the round count (the draws follow from it).  Reports the
    layers' FLOPs: a dense matmul per token, forming W per micro-batch, an SVD per round."""

    name = "sparse_spectral"

    def __init__(self, interval: int) -> None:
        self.interval = interval
        self.rounds = 0
        self._layers: list[SpectralLinear] = []
        self._optimizer: Any = None

    def on_fit_start(self, state: Any) -> None:
        self._layers = spectral_layers(state.model)
        if not self._layers:
            raise ValueError("methods.sparse_spectral: the model has no spectral layer; set peft=sparse_spectral")
        self._optimizer = state.optimizer
        for layer in self._layers:   # a resumed run: the layers' buffers came back with the model, the count here
            layer.rounds = self.rounds

    def on_step_end(self, state: Any) -> None:
        if state.step % self.interval:
            return
        from effitrain.methods.lisa import _unwrap_optimizer

        inner, mapping = _unwrap_optimizer(self._optimizer) if self._optimizer is not None else (None, {})
        for layer in self._layers:
            layer.redecompose()
            for p in (layer.S, layer.U_sampled, layer.V_sampled):
                master = mapping.get(id(p))
                if master is not None:  # a mixed-precision optimizer's fp32 copy must hold the new values too
                    master.data.copy_(p.data)
                if inner is not None:   # re-decomposed factors are new coordinates: Adam starts afresh on them
                    inner.state.pop(master if master is not None else p, None)
        self.rounds += 1
        state.metrics["spectral_rounds"] = self.rounds

    def extra_flops(self, state: Any) -> float:
        micro_batches = state.micro_step * state.world_size   # every process forms W for each of its micro-batches
        total = 0.0
        for layer in self._layers:
            m, n, k = layer.out_features, layer.in_features, layer.full_rank
            total += 6.0 * m * n * state.tokens           # y = x W^T and its backward, every token
            total += 6.0 * m * n * k * micro_batches      # W = U diag(S) V^T and its backward, every micro-batch
            total += svd_flops(m, n) * (self.rounds + 1)  # the initial SVD and one re-decomposition per round
        return total

    def state_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds = int(state["rounds"])
        for layer in self._layers:
            layer.rounds = self.rounds


def build_sparse_spectral_method(params: Any) -> SparseSpectral:
    return SparseSpectral(interval=params.interval)
