"""Model transforms that re-parameterise layers before the optimizer is built (``peft`` group: ``build(params, model)``).

SLTrain lives in the ``peft`` group rather than as a ``fit_start`` hook because it replaces parameters: the optimizer
must be built over the new ones, and the peft builder is the step that runs between the model and the optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import Literal, Optional

from effitrain.config.rules import rule
from effitrain.registry import ConfigError, param, register


@register("peft", "sltrain", builder="effitrain.models.sltrain:build_sltrain",
          summary="SLTrain: linear weights as low-rank B·A plus a fixed-support sparse S (Han et al., 2406.02214)")
@dataclass
class SLTrainParams:
    rank: int = param(128, ge=1, help="rank of B·A (paper: 128 on LLaMA-60M, 256 on 130M/350M)")
    sparsity: float = param(0.03, gt=0, lt=1, help="delta: share of entries in the random sparse support (paper: 0.03)")
    alpha: float = param(32.0, gt=0, help="the low-rank term is scaled by alpha / rank (authors' 60M script: 32 "
                                          "at rank 128, i.e. 0.25)")
    target_modules: list[str] = param(default_factory=lambda: ["self_attn", "mlp"],
                                      help="module-name patterns whose nn.Linear layers are re-parameterised")
    seed: int = param(0, help="seed of the random sparse support")

    def validate(self, path: str) -> None:
        if not self.target_modules:
            raise ConfigError(f"{path}.target_modules: empty; name at least one module pattern")


@register("peft", "static_sparse", builder="effitrain.models.static_sparse:build_static_sparse",
          summary="Static unstructured sparsity: a fixed random mask on every linear weight (SPDF, 2303.10464)")
@dataclass
class StaticSparseParams:
    sparsity: float = param(0.75, gt=0, lt=1, help="share of each weight matrix held at zero (paper: 0.5 and 0.75)")
    target_modules: list[str] = param(default_factory=lambda: ["self_attn", "mlp"],
                                      help="module-name patterns whose nn.Linear weights are masked (the LM head "
                                           "never is)")
    seed: int = param(0, help="seed of the random masks")

    def validate(self, path: str) -> None:
        if not self.target_modules:
            raise ConfigError(f"{path}.target_modules: empty; name at least one module pattern")


@register("peft", "monarch", builder="effitrain.models.monarch:build_monarch",
          summary="Monarch: linear layers as two block-diagonal factors with fixed permutations (Dao et al., "
                  "2204.00595)")
@dataclass
class MonarchParams:
    nblocks: int = param(4, ge=1, help="blocks per factor (the authors' MonarchLinear default: 4); parameters and "
                                       "FLOPs of a square layer fall from n^2 to 2 n^2 / nblocks")
    target_modules: list[str] = param(default_factory=lambda: ["mlp"],
                                      help="module-name patterns whose nn.Linear layers become Monarch (the LM "
                                           "head never does); add self_attn for the attention projections")
    init: Literal["random", "project"] = param("random",
                      help="random: train Monarch from scratch (the authors' per-block init); project: start from "
                           "the best Monarch approximation of the current dense weights (dense-to-Monarch, e.g. "
                           "after a dense stage)")

    def validate(self, path: str) -> None:
        if not self.target_modules:
            raise ConfigError(f"{path}.target_modules: empty; name at least one module pattern")


@rule("static_sparse_whole_weights", "peft=static_sparse masks whole weight matrices: ZeRO stage 3's partitioned "
                                     "parameters are refused")
def _static_sparse_zero3(spec, env) -> Optional[str]:
    if spec.block("peft").name == "static_sparse" and spec.block("parallelism").params.stage == 3:
        return ("peft=static_sparse builds its masks on whole weight matrices, which ZeRO-3 partitions; use "
                "parallelism=zero2 (or ddp)")
    return None
