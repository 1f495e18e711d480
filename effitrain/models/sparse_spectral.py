"""Sparse Spectral Training (SST; Zhao et al., "Sparse Spectral Training and Inference on Euclidean and Hyperbolic
Neural Networks", arXiv 2405.15481): ``peft: sparse_spectral`` plus ``methods: sparse_spectral``.

Each targeted ``nn.Linear`` becomes ``W = U diag(S) V^T``, initialised from the SVD of its weight (exact at the
start: the layer computes what the dense one did).  Then:

* **all singular values** ``S`` are trained every step, and kept ``>= 0`` after each step (a singular value is a
  length: a negative one would flip its vector pair and turn the proportional draw below into nonsense);
* **r singular-vector pairs** (``peft.rank``) are drawn per layer *without replacement with probability
  proportional to the singular values* (a multinomial draw, so strong directions are updated more often, weak ones
  are still explored), and only those columns of ``U`` and ``V`` are trainable; every other column is a buffer the
  optimizer never sees.  After each step the trained columns are **renormalised to unit length** (the magnitude of
  a direction belongs to its singular value, not to its vectors);
* the sampled vectors get the paper's **enhanced gradient** (its section 4.2, proof in its appendix D): the gradient
  of ``W`` times the partner vector, *not* multiplied by ``sigma_i``, so that a direction with a small singular value
  is not also updated slowly (``peft.enhanced_gradient``).  It is computed directly (:class:`_EnhancedSpectralWeight`),
  never by dividing the chain-rule gradient by ``sigma_i``, so a singular value at or near 0 cannot blow it up;
* every **iteration interval** (``methods.sparse_spectral.interval`` steps) the trained vectors are written back and
  a fresh sample is drawn (the sampled columns' optimizer state is dropped: they are other columns now);
* every **round** (``intervals_per_round`` intervals; default ``ceil(k / r)``, enough draws for every pair to have
  been likely drawn once) the whole matrix is **re-decomposed** by SVD instead, which restores
  ``U^T U = V^T V = I`` and keeps ``W``; the optimizer state of the layer's factors (``S`` included, whose
  coordinates the SVD re-sorts) is dropped, and a fresh sample is drawn.

The draws come from generators seeded by (``peft.seed``, layer, draw number), so a resumed run draws what the
uninterrupted one drew.  The forward materialises ``W`` once per micro-batch and multiplies by it (cheaper than two
thin products once a micro-batch has more tokens than the layer has columns); the true FLOPs (dense matmul per
token, forming ``W`` per micro-batch, an SVD per round) are reported by the hook, not counted as 6N of the factors.
Export multiplies ``U diag(S) V^T`` out into a stock ``nn.Linear`` (exact up to float rounding).

The authors' repository (biomedical-cybernetics/sparse-spectral-training) could not be fetched here; the interval /
round split, the renormalisation and the clamp follow an audit of it against this module (issue 22) and the paper's
section 4 (docs/recipes/sparse_spectral.md says what is still a reading).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from effitrain.engine.events import Hook
from effitrain.linalg import svd
from effitrain.models.replace import fold_to_linears, replace_linears


def _generator(seed: int, layer: int, draw: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + layer * 10_007 + draw)


class _EnhancedSpectralWeight(torch.autograd.Function):
    """``W = U' diag(S) V'^T`` (``U'``, ``V'``: the factors with the sampled columns in place) whose backward gives
    the sampled vectors the enhanced gradient ``dL/dW V_i`` and ``dL/dW^T U_i`` (no ``sigma_i`` factor, and no
    division by it) and ``S`` its exact gradient ``U_i^T dL/dW V_i``."""

    @staticmethod
    def forward(ctx: Any, s: torch.Tensor, u_sampled: torch.Tensor, v_sampled: torch.Tensor, u: torch.Tensor,
                v: torch.Tensor, sampled: torch.Tensor) -> torch.Tensor:
        u = u.index_copy(1, sampled, u_sampled.to(u.dtype))
        v = v.index_copy(1, sampled, v_sampled.to(v.dtype))
        ctx.save_for_backward(u, v, sampled)
        return (u * s.to(u.dtype)) @ v.T

    @staticmethod
    def backward(ctx: Any, grad_w: torch.Tensor):
        u, v, sampled = ctx.saved_tensors
        grad_times_v = grad_w @ v                                   # column i: dL/dW V_i
        grad_s = (u * grad_times_v).sum(0)                          # U_i^T dL/dW V_i
        grad_u_sampled = grad_times_v[:, sampled]
        grad_v_sampled = grad_w.T @ u[:, sampled]                   # dL/dW^T U_i
        return grad_s, grad_u_sampled, grad_v_sampled, None, None, None


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
        self.draws = 0    # the number of the current sample (0: the first); it seeds that draw
        self.rounds = 0   # re-decompositions done
        self.load_sample(self.draw(0))

    def default_intervals_per_round(self) -> int:
        """``ceil(k / r)`` intervals: enough draws of ``r`` pairs for each of the ``k`` to be drawn about once."""
        return math.ceil(self.full_rank / self.rank)

    # -- the sample ------------------------------------------------------------------------------------------------
    def draw(self, number: int) -> torch.Tensor:
        """``rank`` indices drawn without replacement, with probability proportional to the singular values."""
        weights = self.S.detach().float().clamp(min=0).cpu()
        if not torch.any(weights > 0):
            weights = torch.ones_like(weights)
        picked = torch.multinomial(weights, self.rank, replacement=False,
                                   generator=_generator(self.seed, self.index, number))
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

    @torch.no_grad()
    def constrain(self) -> None:
        """After an optimizer step: the trained vectors back to unit length, the singular values back to >= 0."""
        for factor in (self.U_sampled, self.V_sampled):
            factor.div_(factor.norm(dim=0, keepdim=True).clamp(min=torch.finfo(factor.dtype).tiny))
        self.S.clamp_(min=0)

    # -- the matrix ------------------------------------------------------------------------------------------------
    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """U and V with the (trainable) sampled columns in place."""
        return (self.U.index_copy(1, self.sampled, self.U_sampled.to(self.U.dtype)),
                self.V.index_copy(1, self.sampled, self.V_sampled.to(self.V.dtype)))

    def dense_weight(self) -> torch.Tensor:
        if self.enhanced_gradient and torch.is_grad_enabled():
            return _EnhancedSpectralWeight.apply(self.S, self.U_sampled, self.V_sampled, self.U, self.V, self.sampled)
        u, v = self.factors()
        return (u * self.S.to(u.dtype)) @ v.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight().to(x.dtype), self.bias)

    @torch.no_grad()
    def resample(self) -> None:
        """End of an iteration interval: write back, draw the next sample from the current singular values."""
        self.write_back()
        self.draws += 1
        self.load_sample(self.draw(self.draws))

    @torch.no_grad()
    def redecompose(self) -> None:
        """End of a round: write back, re-SVD the whole matrix (orthonormal factors again, same W), draw anew."""
        self.write_back()
        u, s, vh = svd(self.dense_weight().float())
        self.U.copy_(u)
        self.V.copy_(vh.T)
        self.S.copy_(s)
        self.rounds += 1
        self.draws += 1
        self.load_sample(self.draw(self.draws))

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
    """SST's schedule over every spectral layer.  After every optimizer step: unit-length trained vectors, ``S >= 0``.
    Every ``interval`` steps: a new draw (write back, drop the sampled columns' optimizer state); every
    ``intervals_per_round`` intervals (default ``ceil(k / r)`` per layer) a re-SVD instead (write back, re-decompose,
    drop the layer's optimizer state, draw).  Checkpointed: the count of intervals ended (the draws and rounds follow
    from it).  Reports the layers' FLOPs: a dense matmul per token, forming W per micro-batch, an SVD per round."""

    name = "sparse_spectral"

    def __init__(self, interval: int, intervals_per_round: Optional[int] = None) -> None:
        self.interval = interval
        self.intervals_per_round = intervals_per_round
        self.intervals = 0
        self._layers: list[SpectralLinear] = []
        self._optimizer: Any = None

    def round_length(self, layer: SpectralLinear) -> int:
        """Intervals per round of ``layer``."""
        return self.intervals_per_round or layer.default_intervals_per_round()

    def _sync_counters(self) -> None:
        for layer in self._layers:   # a resumed run: the layers' buffers came back with the model, the counts here
            layer.draws = self.intervals
            layer.rounds = self.intervals // self.round_length(layer)

    def on_fit_start(self, state: Any) -> None:
        self._layers = spectral_layers(state.model)
        if not self._layers:
            raise ValueError("methods.sparse_spectral: the model has no spectral layer; set peft=sparse_spectral")
        self._optimizer = state.optimizer
        self._sync_counters()

    def _after_change(self, layer: SpectralLinear, moved: tuple[nn.Parameter, ...], mapping: dict, inner: Any) -> None:
        """The factors were rewritten in place: a mixed-precision optimizer's fp32 copies must hold the new values,
        and the optimizer state of the ``moved`` ones (new coordinates) is dropped."""
        for p in (layer.S, layer.U_sampled, layer.V_sampled):
            master = mapping.get(id(p))
            if master is not None:
                master.data.copy_(p.data)
            if inner is not None and any(p is m for m in moved):
                inner.state.pop(master if master is not None else p, None)

    def on_step_end(self, state: Any) -> None:
        from effitrain.methods.lisa import _unwrap_optimizer

        inner, mapping = _unwrap_optimizer(self._optimizer) if self._optimizer is not None else (None, {})
        interval_ends = state.step % self.interval == 0
        if interval_ends:
            self.intervals += 1
        for layer in self._layers:
            layer.constrain()
            moved: tuple[nn.Parameter, ...] = ()
            if interval_ends and self.intervals % self.round_length(layer) == 0:
                layer.redecompose()          # new coordinates for S and the vectors alike
                moved = (layer.S, layer.U_sampled, layer.V_sampled)
            elif interval_ends:
                layer.resample()             # S keeps its coordinates (and its moments); the vectors are others
                moved = (layer.U_sampled, layer.V_sampled)
            self._after_change(layer, moved, mapping, inner)
        state.metrics["spectral_draws"] = self.intervals
        state.metrics["spectral_rounds"] = sum(layer.rounds for layer in self._layers) / len(self._layers)

    def extra_flops(self, state: Any) -> float:
        micro_batches = state.micro_step * state.world_size   # every process forms W for each of its micro-batches
        total = 0.0
        for layer in self._layers:
            m, n, k = layer.out_features, layer.in_features, layer.full_rank
            total += 6.0 * m * n * state.tokens           # y = x W^T and its backward, every token
            total += 6.0 * m * n * k * micro_batches      # W = U diag(S) V^T and its backward, every micro-batch
            total += svd_flops(m, n) * (layer.rounds + 1)  # the initial SVD and one re-decomposition per round
        return total

    def state_dict(self) -> dict[str, Any]:
        return {"intervals": self.intervals}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "intervals" not in state:
            from effitrain.registry import ConfigError
            raise ConfigError("resume: the checkpoint's methods.sparse_spectral state predates the interval/round "
                              "schedule (it re-decomposed at every interval); start the run afresh")
        self.intervals = int(state["intervals"])
        self._sync_counters()


def build_sparse_spectral_method(params: Any) -> SparseSpectral:
    return SparseSpectral(interval=params.interval, intervals_per_round=params.intervals_per_round)
