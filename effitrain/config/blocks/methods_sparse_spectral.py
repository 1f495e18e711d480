"""Sparse Spectral Training (Zhao et al., 2405.15481): the layer block ``peft: sparse_spectral`` and the round hook
``methods: sparse_spectral``, with the rules that keep them sound (effitrain/models/sparse_spectral.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from effitrain.config.rules import rule
from effitrain.registry import ConfigError, param, register


@register("peft", "sparse_spectral", builder="effitrain.models.sparse_spectral:build_sparse_spectral",
          summary="Sparse Spectral Training: W = U diag(S) V^T from the SVD; all S and r sampled vector pairs "
                  "trained, re-SVD every round (Zhao et al., 2405.15481)")
@dataclass
class SparseSpectralParams:
    rank: int = param(64, ge=1, help="singular-vector pairs trained per round and layer (the paper's r = 64 for "
                                     "its OPT models); at most the layer's smaller side")
    target_modules: list[str] = param(default_factory=lambda: ["self_attn", "mlp"],
                                      help="module-name patterns whose nn.Linear layers become spectral (the LM "
                                           "head never does)")
    enhanced_gradient: bool = param(True, help="the paper's enhanced gradient: the sampled vectors' gradient is not "
                                               "scaled by their singular value")
    seed: int = param(0, help="seed of the multinomial draws (with the layer and round)")

    def validate(self, path: str) -> None:
        if not self.target_modules:
            raise ConfigError(f"{path}.target_modules: empty; name at least one module pattern")


@register("method", "sparse_spectral", builder="effitrain.models.sparse_spectral:build_sparse_spectral_method",
          summary="Sparse Spectral Training's schedule: unit-length vectors and S >= 0 after each step, a new draw "
                  "of singular vectors every interval, a re-SVD (optimizer state reset) every round of intervals")
@dataclass
class SparseSpectralMethodParams:
    interval: int = param(10, ge=1, help="the paper's iteration interval: optimizer steps between two draws of the "
                                         "trained singular-vector pairs (the authors' value is unverified, see "
                                         "the recipe card)")
    intervals_per_round: Optional[int] = param(
        None, ge=1, help="intervals per round, each round ending in a re-SVD; null = ceil(k / r) per layer (k its "
                         "full rank, r peft.rank: enough draws for every pair to be drawn about once), a reading of "
                         "the paper")


def _has_method(spec) -> bool:
    return any(block.name == "sparse_spectral" for block in spec.methods.values())


@rule("sparse_spectral_pairs", "peft=sparse_spectral and methods.sparse_spectral go together: layers without rounds "
                               "would train one sample forever; rounds without spectral layers do nothing")
def _pairing(spec, env) -> Optional[str]:
    layers = spec.block("peft").name == "sparse_spectral"
    rounds = _has_method(spec)
    if layers and not rounds:
        return ("peft=sparse_spectral trains the vectors of one draw until methods.sparse_spectral ends a round; add "
                "'+methods.sparse_spectral={}' (or +recipe=sparse_spectral)")
    if rounds and not layers:
        return f"methods.sparse_spectral re-decomposes peft=sparse_spectral layers; this run has peft={spec.block('peft').name}"
    return None


@rule("sparse_spectral_rewrites_its_factors",
      "methods.sparse_spectral rewrites its factors in place every round: ZeRO stage >= 1 and bf16/fp16 master copies "
      "are refused")
def _in_place(spec, env) -> Optional[str]:
    if not _has_method(spec):
        return None
    stage = spec.block("parallelism").params.stage
    if stage >= 1:
        return (f"methods.sparse_spectral re-decomposes each layer in place at the end of a round, but ZeRO stage "
                f"{stage} keeps flat optimizer partitions built at start-up that would not see it; use "
                f"parallelism=ddp (ZeRO stage 0)")
    precision = spec.block("precision").name
    if precision == "auto" and env.device_type == "cuda":
        precision = "bf16 (precision=auto on a GPU)"
    if precision not in ("fp32", "auto"):
        return (f"methods.sparse_spectral re-decomposes each layer in place, but precision={precision} makes "
                f"DeepSpeed keep flat fp32 master copies that would overwrite it; use precision=fp32")
    return None
