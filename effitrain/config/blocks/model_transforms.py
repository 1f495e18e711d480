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


@register("peft", "structured_ffn", builder="effitrain.models.structured_ffn:build_structured_ffn",
          summary="Structured FFN layers: LowRank, BlockShuffle or BlockDense, optionally with a decaying dense "
                  "guide (Wei et al., 2406.16450)")
@dataclass
class StructuredFFNParams:
    kind: Literal["lowrank", "blockshuffle", "blockdense"] = param(
        "lowrank", help="lowrank: W = U V; blockshuffle: two block-diagonal factors with a shuffle (Monarch's op); "
                        "blockdense: a block-diagonal factor then a dense one")
    rank: Optional[int] = param(None, ge=1, help="rank of lowrank/blockdense; null = rank_ratio x the layer's smaller "
                                                 "side (rounded to a multiple of nblocks)")
    rank_ratio: float = param(0.25, gt=0, le=1, help="rank / smaller side when rank is null (authors' GPT-2 small "
                                                      "LowRank: 192 / 768)")
    nblocks: int = param(4, ge=1, help="blocks of blockshuffle/blockdense (authors' scripts: 4 for BlockShuffle, "
                                       "2-4 for BlockDense)")
    guide: bool = param(True, help="add the dense guide of self-guided training (needs methods.self_guided, which "
                                   "decays it away)")
    target_modules: list[str] = param(default_factory=lambda: ["mlp"],
                                      help="module-name patterns whose nn.Linear layers become structured (the paper "
                                           "structures the feed-forward layers)")
    first_layer_dense: bool = param(False, help="keep the first decoder block's linears dense (the authors' "
                                                "first_layer: true, in every one of their configs)")
    seed: int = param(0, help="seed of the structured layers' initialisation")

    def validate(self, path: str) -> None:
        if not self.target_modules:
            raise ConfigError(f"{path}.target_modules: empty; name at least one module pattern")


@rule("self_guided_needs_a_guide", "methods.self_guided and peft.guide go together: a guide nothing decays would "
                                   "train a dense layer; a decay with no guide does nothing")
def _self_guided_pairing(spec, env) -> Optional[str]:
    peft = spec.block("peft")
    guided = peft.name == "structured_ffn" and peft.params.guide
    decayed = any(block.name == "self_guided" for block in spec.methods.values())
    if guided and not decayed:
        return ("peft.guide=true adds a dense guide to every structured layer, and only methods.self_guided decays "
                "it away; add '+methods.self_guided={}' (or +recipe=structured_ffn), or set peft.guide=false")
    if decayed and not guided:
        return ("methods.self_guided decays the dense guide of peft=structured_ffn with peft.guide=true; this run "
                f"has peft={peft.name}{' with guide=false' if peft.name == 'structured_ffn' else ''}")
    return None
