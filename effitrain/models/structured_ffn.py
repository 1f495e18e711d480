"""Structured feed-forward layers with self-guided training (Wei, Moalla, Pascanu, Gulcehre, "Building on Efficient
Foundations: Effectively Training LLMs with Structured Feedforward Layers", NeurIPS 2024, arXiv 2406.16450; authors'
code: CLAIRE-Labo/StructuredFFN).

Three structures replace a feed-forward ``nn.Linear`` (``W`` is ``[out, in]``):

* ``lowrank``: ``W = lr2 · lr1`` with ``lr1 [r, in]``, ``lr2 [out, r]``; the authors initialise it from the truncated
  SVD of a random dense init (``post_init: svd``): ``lr1 = sqrt(S_r) Vh_r``, ``lr2 = U_r sqrt(S_r)``.
* ``blockshuffle``: two block-diagonal factors with a shuffle between them; the authors' op is Monarch's
  (``block_shuffle`` "paste from Monarch"), so this is :class:`effitrain.models.monarch.MonarchLinear` with the
  authors' initialisation (each block normal with std ``fan_in^-1/2``, then orthogonalised: ``post_init: ortho``).
* ``blockdense``: a block-diagonal ``[r, in]`` factor (``nblocks`` blocks ``[r/k, in/k]``) followed by a dense
  ``[out, r]`` one, no permutation; blocks and the dense factor orthogonalised at init.

Self-guided training (``guide: true``): each structured layer gets a dense guide ``G`` (``[out, in]``) initialised to
the structured layer's effective matrix, and computes ``alpha·G x + (1 - alpha)·S(x)``; :class:`SelfGuided` (the
``methods.self_guided`` hook) sets ``alpha`` from 1 to 0 over the first ``steps_ratio`` of training (the authors'
``max_step_ratio: 0.5``, cosine decay by default), after which the guide is not computed at all.  The guide's training
FLOPs (``6·|G|`` per token of every step a layer mixes its guide in; with ``reduce_flop`` a layer does so with
probability ``alpha``, as the authors' scripts run it) are reported by the hook (:meth:`SelfGuided.extra_flops`); the
guide parameters are left out of the 6N count (:func:`flops_excluded`) so that the summary's ``flops`` are what ran.

Export: :func:`fold_structured` writes each layer as the ``nn.Linear`` of its effective matrix
``alpha·G + (1 - alpha)·S`` (just ``S`` once the guide has decayed), a stock ``transformers`` model.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from effitrain.engine.events import Hook
from effitrain.linalg import svd
from effitrain.models.monarch import MonarchLinear
from effitrain.models.replace import fold_to_linears, replace_linears
from effitrain.registry import ConfigError

KINDS = ("lowrank", "blockshuffle", "blockdense")


def _normal_fan_in(param: torch.Tensor) -> None:
    # the authors' ``weight_init: xavier``: normal with std fan_in^-1/2 on every factor
    nn.init.normal_(param, mean=0.0, std=param.shape[-1] ** -0.5)


@torch.no_grad()
def _orthogonalise(matrix: torch.Tensor) -> torch.Tensor:
    """The authors' ``post_init: ortho``: ``U Vh`` of the matrix's SVD (its singular values set to one)."""
    u, _, vh = svd(matrix)
    return u @ vh


class LowRankLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ConfigError(f"peft.rank: {rank} is outside [1, {min(in_features, out_features)}] for a "
                              f"{in_features}x{out_features} layer")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.lr1 = nn.Parameter(torch.empty(rank, in_features))
        self.lr2 = nn.Parameter(torch.empty(out_features, rank))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        with torch.no_grad():   # post_init "svd": the best rank-r approximation of a random dense init
            dense = torch.empty(out_features, in_features)
            _normal_fan_in(dense)
            u, s, vh = svd(dense)
            root = s[:rank].sqrt()
            self.lr1.copy_(root[:, None] * vh[:rank])
            self.lr2.copy_(u[:, :rank] * root[None, :])

    def structured(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.lr1.T) @ self.lr2.T

    def effective_weight(self) -> torch.Tensor:
        return self.lr2 @ self.lr1


class BlockDenseLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, nblocks: int, bias: bool = True) -> None:
        super().__init__()
        if in_features % nblocks or rank % nblocks:
            raise ConfigError(f"peft.nblocks: blockdense needs the layer's input width ({in_features}) and the "
                              f"rank ({rank}) to be multiples of nblocks ({nblocks}); choose a divisor of both")
        self.in_features, self.out_features, self.rank, self.nblocks = in_features, out_features, rank, nblocks
        self.blkdiag = nn.Parameter(torch.empty(nblocks, rank // nblocks, in_features // nblocks))
        self.lr = nn.Parameter(torch.empty(out_features, rank))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        with torch.no_grad():
            _normal_fan_in(self.blkdiag)
            _normal_fan_in(self.lr)
            for i in range(nblocks):
                self.blkdiag[i] = _orthogonalise(self.blkdiag[i])
            self.lr.copy_(_orthogonalise(self.lr))

    def structured(self, x: torch.Tensor) -> torch.Tensor:
        k = self.nblocks
        lead = x.shape[:-1]
        h = torch.einsum("nkp,kqp->nkq", x.reshape(-1, k, self.in_features // k), self.blkdiag)
        return (h.reshape(-1, self.rank) @ self.lr.T).reshape(*lead, self.out_features)

    def effective_weight(self) -> torch.Tensor:
        return self.lr @ torch.block_diag(*self.blkdiag)


class BlockShuffleLinear(MonarchLinear):
    def __init__(self, in_features: int, out_features: int, nblocks: int, bias: bool = True) -> None:
        if in_features % nblocks or out_features % nblocks:
            raise ConfigError(f"peft.nblocks: blockshuffle needs the layer's widths ({in_features}, {out_features}) "
                              f"to be multiples of nblocks ({nblocks}); choose a common divisor")
        super().__init__(in_features, out_features, nblocks, bias=bias)
        with torch.no_grad():
            for blocks in (self.blkdiag1, self.blkdiag2):
                _normal_fan_in(blocks)
                for i in range(nblocks):
                    blocks[i] = _orthogonalise(blocks[i])
            if self.bias is not None:
                self.bias.zero_()

    def structured(self, x: torch.Tensor) -> torch.Tensor:
        bias, self.bias = self.bias, None
        try:
            return MonarchLinear.forward(self, x)
        finally:
            self.bias = bias

    def effective_weight(self) -> torch.Tensor:
        return self.dense_weight()   # the Monarch matrix, bias excluded


class StructuredFFNLinear(nn.Module):
    """One structured layer (``self.inner``), with an optional dense guide mixed in by ``alpha``."""

    def __init__(self, inner: nn.Module, guide: bool) -> None:
        super().__init__()
        self.inner = inner
        self.in_features, self.out_features = inner.in_features, inner.out_features
        self.register_parameter("guide", None)
        # alpha is set by the self_guided hook before every micro-batch: a Python float for the forward (no device
        # sync) and a buffer, so that a checkpoint (and an export from it) holds the mixture it was trained with
        self._alpha = 1.0 if guide else 0.0
        self.use_guide = guide          # this step mixes the guide in (reduce_flop draws it per step)
        self.register_buffer("alpha", torch.tensor(self._alpha))
        if guide:
            with torch.no_grad():   # the authors' guide starts as the structured layer's own matrix
                self.guide = nn.Parameter(inner.effective_weight().detach().clone())
            self.guide._effitrain_flops_excluded = True   # counted by the hook while it runs, not as 6N

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.inner.bias

    def set_alpha(self, alpha: float) -> None:
        self._alpha = float(alpha)
        self.alpha.fill_(self._alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner.structured(x)
        if self.guide is not None and self._alpha > 0 and self.use_guide:
            out = self._alpha * (x @ self.guide.T) + (1 - self._alpha) * out
        if self.inner.bias is not None:
            out = out + self.inner.bias
        return out

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        weight = self.inner.effective_weight()
        alpha = float(self.alpha)
        if self.guide is not None and alpha > 0:
            weight = alpha * self.guide + (1 - alpha) * weight
        return weight


def make_structured(linear: nn.Linear, kind: str, *, rank: Optional[int], nblocks: int, guide: bool,
                    rank_ratio: Optional[float]) -> StructuredFFNLinear:
    in_f, out_f, bias = linear.in_features, linear.out_features, linear.bias is not None
    if kind != "blockshuffle":
        rank = rank if rank is not None else max(nblocks, int(round(rank_ratio * min(in_f, out_f) / nblocks)) * nblocks)
    if kind == "lowrank":
        inner: nn.Module = LowRankLinear(in_f, out_f, rank, bias=bias)
    elif kind == "blockdense":
        inner = BlockDenseLinear(in_f, out_f, rank, nblocks, bias=bias)
    elif kind == "blockshuffle":
        inner = BlockShuffleLinear(in_f, out_f, nblocks, bias=bias)
    else:
        raise ValueError(f"structured_ffn: unknown kind {kind!r}; valid: {', '.join(KINDS)}")
    layer = StructuredFFNLinear(inner, guide)
    return layer.to(device=linear.weight.device, dtype=linear.weight.dtype)


def apply_structured_ffn(model: nn.Module, *, kind: str, rank: Optional[int], rank_ratio: Optional[float],
                         nblocks: int, guide: bool, target_modules: list[str], seed: int,
                         first_layer_dense: bool = False) -> int:
    """Structure the matching linears; ``first_layer_dense`` leaves the first decoder block's alone (the authors'
    ``first_layer: true``, set in every one of their configs)."""
    exclude: tuple[str, ...] = ()
    if first_layer_dense:
        from effitrain.models.transforms import decoder_layers

        prefix, _ = decoder_layers(model)
        exclude = (f"{prefix}.0.",)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return replace_linears(model, target_modules, lambda linear: make_structured(
            linear, kind, rank=rank, nblocks=nblocks, guide=guide, rank_ratio=rank_ratio), exclude=exclude)


def build_structured_ffn(params: Any, model: nn.Module) -> nn.Module:
    apply_structured_ffn(model, kind=params.kind, rank=params.rank, rank_ratio=params.rank_ratio,
                         nblocks=params.nblocks, guide=params.guide, target_modules=list(params.target_modules),
                         seed=params.seed, first_layer_dense=params.first_layer_dense)
    return model


def structured_layers(model: nn.Module) -> list[StructuredFFNLinear]:
    return [m for m in model.modules() if isinstance(m, StructuredFFNLinear)]


def has_structured_ffn(model: nn.Module) -> bool:
    return bool(structured_layers(model))


def fold_structured(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every structured layer replaced by the ``nn.Linear`` of its effective matrix."""
    return fold_to_linears(model, StructuredFFNLinear, lambda layer: layer.effective_weight())


# ---------------------------------------------------------------------------------------------- self-guided hook
def guide_weight(step: int, guided_steps: int, schedule: str) -> float:
    """alpha after ``step`` optimizer steps: 1 at step 0, 0 from ``guided_steps`` on (the authors' LinearTempDecay /
    CosineTempDecay with no warm-up)."""
    if guided_steps <= 0 or step >= guided_steps:
        return 0.0
    t = step / guided_steps
    return 1.0 - t if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * t))


class SelfGuided(Hook):
    """Sets every structured layer's ``alpha`` before each optimizer step from the step count, and, with
    ``reduce_flop`` (the authors' setting in their scripts), lets each layer use its guide in a micro-batch only
    with probability ``alpha`` (else the structured path alone): a new draw for every micro-batch, as the authors'
    forward pass draws it (``draw_every: step`` keeps one draw for all micro-batches of a step), from a generator
    seeded by (seed, draw number) so that a resumed run makes the same draws.  The guides' FLOPs actually run are
    summed (and checkpointed) for the summary."""

    name = "self_guided"

    def __init__(self, steps_ratio: float, schedule: str, reduce_flop: bool, seed: int,
                 draw_every: str = "micro_batch") -> None:
        self.steps_ratio = steps_ratio
        self.schedule = schedule
        self.reduce_flop = reduce_flop
        self.seed = seed
        self.draw_every = draw_every
        self.guided_steps = 0
        self.flops = 0.0              # training FLOPs of the guides so far
        self._layers: list[StructuredFFNLinear] = []
        self._decided: Optional[int] = None      # the draw the layers are set for
        self._guide_params_this_step: list[int] = []   # per micro-batch of the step: guide parameters that ran
        self._tokens_at_step_start = 0

    def on_fit_start(self, state: Any) -> None:
        self._layers = [m for m in structured_layers(state.model) if m.guide is not None]
        if not self._layers:
            raise ValueError("methods.self_guided: the model has no guided structured layer; set "
                             "peft=structured_ffn with peft.guide=true")
        self.guided_steps = int(state.spec.train.max_steps * self.steps_ratio)

    def guide_use(self, draw: int, alpha: float) -> list[bool]:
        """Which layers mix their guide in for draw number ``draw`` (a micro-batch's, or a step's)."""
        if alpha <= 0:
            return [False] * len(self._layers)
        if not self.reduce_flop:
            return [True] * len(self._layers)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + draw)
        return (torch.rand(len(self._layers), generator=generator) < alpha).tolist()

    def on_batch_start(self, state: Any) -> None:
        draw = state.micro_step if self.draw_every == "micro_batch" else state.step
        if self._decided == draw:                 # draw_every=step: the same mixture for every micro-batch
            return
        if not self._guide_params_this_step:      # the step's first draw (on_step_end empties the list)
            self._tokens_at_step_start = state.tokens
        alpha = guide_weight(state.step, self.guided_steps, self.schedule)   # alpha follows the optimizer step
        use = self.guide_use(draw, alpha)
        for layer, used in zip(self._layers, use):
            layer.set_alpha(alpha)
            layer.use_guide = used
        self._decided = draw
        self._guide_params_this_step.append(sum(layer.guide.numel() for layer, used in zip(self._layers, use)
                                                if used))
        state.metrics["guide_alpha"] = alpha

    def on_step_end(self, state: Any) -> None:
        # each micro-batch holds an equal share of the step's tokens; draw_every=step made one draw for all of them
        tokens = state.tokens - self._tokens_at_step_start
        per_draw = sum(self._guide_params_this_step) / max(len(self._guide_params_this_step), 1)
        self.flops += 6.0 * per_draw * tokens
        self._guide_params_this_step = []

    def extra_flops(self, state: Any) -> float:
        return self.flops

    def state_dict(self) -> dict[str, Any]:
        return {"flops": self.flops}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.flops = float(state["flops"])


def build_self_guided(params: Any) -> SelfGuided:
    return SelfGuided(steps_ratio=params.steps_ratio, schedule=params.schedule, reduce_flop=params.reduce_flop,
                      seed=params.seed, draw_every=params.draw_every)
