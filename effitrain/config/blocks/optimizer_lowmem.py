"""Memory-efficient optimizers: the GaLore family, 8-bit AdamW, APOLLO and Adam-mini (torch-free schemas + rules).

GaLore, Natural GaLore and the DCT (SVD-free) projection are one optimizer (``effitrain.optim.galore``) with three
projector strategies (``effitrain.optim.projectors``); each has its own registry name so that a recipe says which
paper it reproduces, and the projector-specific knobs are typed per name.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional

from effitrain.config.rules import rule
from effitrain.registry import ConfigError, param, register

#: the modules whose 2-D weights GaLore projects in the paper's code ("attn" or "mlp" in the module name)
DEFAULT_TARGETS = ["self_attn", "mlp"]


@dataclass
class _AdamCommon:
    lr: float = param(1e-3, gt=0)
    weight_decay: float = param(0.0, ge=0, help="decoupled (AdamW) decay on 2-D weights; biases and norms never decay")
    beta1: float = param(0.9, ge=0, lt=1)
    beta2: float = param(0.999, ge=0, lt=1)
    eps: float = param(1e-8, gt=0)
    per_layer_updates: bool = param(False, help="step each parameter inside the backward pass and free its "
                                                "gradient (GaLore's per-layer weight updates); needs grad_accum 1, "
                                                "no clipping, ZeRO 0, one process")


@dataclass
class _Refreshing:
    """How often a projected optimizer redraws its subspace: a fixed gap, or a number of refreshes per run."""
    update_proj_gap: Optional[int] = param(200, ge=1, help="optimizer steps between projector refreshes (paper: 200)")
    refreshes_per_run: Optional[int] = param(None, ge=1, help="instead of update_proj_gap: refresh every "
                                             "max_steps // refreshes_per_run steps (paper: 10k steps / 200 = 50)")

    def _check_refresh(self, path: str) -> None:
        if (self.update_proj_gap is None) == (self.refreshes_per_run is None):
            raise ConfigError(f"{path}: set exactly one of update_proj_gap and refreshes_per_run (the other to null), "
                              f"got update_proj_gap={self.update_proj_gap}, refreshes_per_run={self.refreshes_per_run}")


@dataclass
class _GaLoreCommon(_AdamCommon, _Refreshing):
    eps: float = param(1e-6, gt=0, help="GaLore's AdamW default (1e-6)")
    rank: int = param(128, ge=1, help="projection rank r (paper: 128 for 60M, 256 for 130M-350M, 512 for 1B)")
    scale: float = param(0.25, gt=0, help="alpha: multiplier of the projected-back update (paper: 0.25)")
    target_modules: list[str] = param(default_factory=lambda: list(DEFAULT_TARGETS),
                                      help="module-name patterns whose 2-D weights are projected; the rest use AdamW")
    state_bits: Literal[32, 8] = param(32, help="8 = moments stored block-wise quantised to 8 bits (bitsandbytes)")

    projector: ClassVar[str]

    def validate(self, path: str) -> None:
        if not self.target_modules:
            raise ConfigError(f"{path}.target_modules: empty; name at least one module pattern, e.g. {DEFAULT_TARGETS}")
        self._check_refresh(path)


@register("optimizer", "galore", builder="effitrain.optim.galore:build_galore",
          summary="GaLore: Adam in a rank-r SVD subspace of each 2-D gradient (Zhao et al., 2403.03507)")
@dataclass
class GaLoreParams(_GaLoreCommon):
    projector: ClassVar[str] = "svd"


@register("optimizer", "natural_galore", builder="effitrain.optim.galore:build_galore",
          summary="Natural GaLore: GaLore + inverse empirical Fisher on the low-rank gradient (Das, 2410.16029)")
@dataclass
class NaturalGaLoreParams(_GaLoreCommon):
    history: int = param(20, ge=1, help="s: projected gradients kept for the empirical Fisher (authors' default 20)")
    damping: float = param(1e-3, gt=0, help="lambda, absolute: F = lambda I + G G^T (authors' default 1e-3)")
    reset_history_on_refresh: bool = param(False, help="clear the gradient window when the subspace changes "
                                                       "(the authors keep it)")
    projector: ClassVar[str] = "natural"


@register("optimizer", "dct_lowrank", builder="effitrain.optim.galore:build_galore",
          summary="SVD-free GaLore: r columns of a fixed DCT basis picked by alignment (Modoranu et al., 2505.17967)")
@dataclass
class DCTLowRankParams(_GaLoreCommon):
    eps: float = param(1e-8, gt=0, help="DCT-AdamW's default (1e-8, on the bias-corrected sqrt(v))")
    update_proj_gap: Optional[int] = param(1, ge=1, help="steps between column re-selections (DCT-AdamW default: "
                                                          "1, every step)")
    scale: float = param(1.0, gt=0, help="multiplier of the projected-back update (DCT-AdamW has none: 1)")
    rotate_moments: bool = param(False, help="rotate Adam's moments into the new subspace on a refresh (the "
                                             "authors' rotate_subspace option, off by default)")
    projector: ClassVar[str] = "dct"


@register("optimizer", "adamw_8bit", builder="effitrain.optim.lowbit:build_adamw_8bit",
          summary="AdamW with block-wise 8-bit moments, bitsandbytes (Dettmers et al., 2110.02861)")
@dataclass
class AdamW8bitParams(_AdamCommon):
    weight_decay: float = param(0.1, ge=0)
    beta2: float = param(0.95, ge=0, lt=1)
    min_8bit_size: int = param(4096, ge=1, help="tensors with fewer elements keep 32-bit state (bitsandbytes default)")


@register("optimizer", "apollo", builder="effitrain.optim.apollo:build_apollo",
          summary="APOLLO: SGD-like memory, AdamW-like updates via random-projection scaling (Zhu et al., 2412.05270)")
@dataclass
class ApolloParams(_AdamCommon, _Refreshing):
    lr: float = param(1e-2, gt=0, help="APOLLO's scripts use 1e-2")
    eps: float = param(1e-6, gt=0, help="the authors' AdamW default (1e-6)")
    rank: int = param(256, ge=1, help="random projection rank (60M script: 128 = hidden/4; APOLLO-Mini: 1)")
    scale: float = param(1.0, gt=0, help="alpha: the update is multiplied by sqrt(alpha) once (APOLLO-Mini: 128)")
    scale_type: Literal["channel", "tensor"] = param("channel", help="channel-wise (APOLLO) or tensor-wise (Mini)")
    scale_front: bool = param(False, help="apply sqrt(alpha) before the norm-growth limiter (APOLLO-Mini scripts)")
    seed: int = param(0, help="base seed of the random projections (one stream per parameter, redrawn per refresh)")
    target_modules: list[str] = param(default_factory=lambda: list(DEFAULT_TARGETS))

    def validate(self, path: str) -> None:
        if not self.target_modules:
            raise ConfigError(f"{path}.target_modules: empty; name at least one module pattern, e.g. {DEFAULT_TARGETS}")
        self._check_refresh(path)


@register("optimizer", "adam_mini", builder="effitrain.optim.adam_mini:build_adam_mini",
          summary="Adam-mini: one second moment per parameter block/head (Zhang et al., 2406.16793)")
@dataclass
class AdamMiniParams(_AdamCommon):
    lr: float = param(3e-3, gt=0, help="the authors: use AdamW's learning rate (effitrain's adamw: 3e-3)")
    weight_decay: float = param(0.1, ge=0)
    beta2: float = param(0.95, ge=0, lt=1)
    partition: Literal["v1.1", "v1.0"] = param("v1.1", help="v1.1: the current release (q/k per head; v, o, MLP per "
                                                            "neuron; embedding/head per token); v1.0: releases <= "
                                                            "1.0.4 (embedding/head full Adam, v/o/MLP one per tensor)")


#: optimizers whose update depends on each parameter's own matrix shape (or name), so they must see unflattened,
#: unpartitioned parameters
SHAPE_AWARE = {"galore", "natural_galore", "dct_lowrank", "apollo", "adam_mini", "muon", "cosmos"}

#: optimizers whose state is stored 8-bit by bitsandbytes kernels (block-wise quantisation)
def _uses_bnb(spec) -> bool:
    opt = spec.blocks["optimizer"]
    return opt.name == "adamw_8bit" or (opt.name in {"galore", "natural_galore", "dct_lowrank"}
                                        and opt.params.state_bits == 8)


@rule("galore_needs_2d_gradients",
      "GaLore-family / APOLLO / Adam-mini / Muon / COSMOS need each weight as its own 2-D tensor: ZeRO stage >= 1 is refused")
def _galore_zero(spec, env) -> Optional[str]:
    opt = spec.blocks["optimizer"].name
    stage = spec.blocks["parallelism"].params.stage
    if opt in SHAPE_AWARE and stage >= 1:
        return (f"optimizer '{opt}' projects, groups or orthogonalises each weight matrix by its shape, but ZeRO stage {stage} hands "
                f"the optimizer flattened 1-D partitions. Use parallelism=ddp (ZeRO stage 0), or keep ZeRO and use "
                f"optimizer=adamw_8bit for low optimizer memory")
    return None


# bitsandbytes gained CPU kernels for its 8-bit optimizers in 0.50 (bitsandbytes PR #1901); before that the
# blockwise 8-bit update existed only for CUDA (and XPU/ROCm builds).
BNB_MIN_CPU_VERSION = (0, 50)
BNB_DEVICES = {"cuda"}


def bnb_version() -> Optional[tuple[int, ...]]:
    """The installed bitsandbytes version, read from package metadata (no import: rules stay torch-free)."""
    try:
        text = importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        return None
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


@rule("eight_bit_optimizer_device",
      "8-bit optimizer state needs bitsandbytes with kernels for the device (CUDA, or CPU from bitsandbytes 0.50)")
def _eight_bit_device(spec, env) -> Optional[str]:
    if not _uses_bnb(spec):
        return None
    opt = spec.blocks["optimizer"].name
    version = bnb_version()
    if version is None:
        return (f"optimizer '{opt}' with 8-bit state needs bitsandbytes, which is not installed. "
                f"Install it (pip install 'effitrain[methods]') or use optimizer=adamw")
    if env.device_type is None or env.device_type in BNB_DEVICES:
        return None  # unknown device: checked again at launch, when the device is known
    if env.device_type == "cpu":
        if version < BNB_MIN_CPU_VERSION:
            have = ".".join(map(str, version))
            return (f"optimizer '{opt}' with 8-bit state needs bitsandbytes >= 0.50 on CPU (installed: {have}, "
                    f"whose 8-bit optimizer kernels are CUDA-only). Upgrade bitsandbytes, train on a GPU, or use "
                    f"optimizer=adamw (or galore with state_bits: 32)")
        return None
    return (f"optimizer '{opt}' with 8-bit state has no bitsandbytes kernels for device '{env.device_type}'. "
            f"Use optimizer=adamw (or galore with state_bits: 32)")

