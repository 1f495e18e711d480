"""FP8 training blocks (torch-free schemas + rules): ``precision=fp8`` (torchao float8 linears), ``precision=coat``
(float8 linears + FP8 storage of the activations saved for backward) and ``optimizer=adamw_fp8`` (torchao's AdamW
with both moments stored in FP8).  The ``coat`` recipe combines the last two (COAT, arXiv 2410.19313).

FP8 matrix multiplies (``torch._scaled_mm``) exist only on CUDA GPUs of compute capability 8.9 or newer (Ada,
Hopper, Blackwell), so both precisions are refused everywhere else before anything is built.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import ClassVar, Literal

from effitrain.config.blocks.precision import _PrecisionParams
from effitrain.config.rules import rule
from effitrain.registry import ConfigError, param, register


def torchao_installed() -> bool:
    return importlib.util.find_spec("torchao") is not None


@dataclass
class _Float8Linears:
    scaling: Literal["tensorwise", "rowwise", "rowwise_with_gw_hp"] = param(
        "tensorwise", help="torchao Float8LinearRecipeName: one scale per tensor (fastest), per row, or per row "
                           "with the weight gradient kept in high precision (most accurate)")
    skip_modules: list[str] = param(default_factory=lambda: ["lm_head"],
                                    help="linears whose qualified name contains one of these stay in bf16")


@register("precision", "fp8", builder="effitrain.precision.build:build_precision",
          summary="torchao float8 training: linear layers compute in FP8 with dynamic scales, the rest in bf16 "
                  "(CUDA, compute capability >= 8.9)")
@dataclass
class Fp8Precision(_Float8Linears, _PrecisionParams):
    mode: ClassVar[str] = "fp8"


@register("precision", "coat", builder="effitrain.precision.build:build_precision",
          summary="COAT-style FP8 training: float8 linears plus activations saved for backward stored in FP8 "
                  "(E4M3, one scale per group); pair with optimizer=adamw_fp8 (the coat recipe)")
@dataclass
class CoatPrecision(_Float8Linears, _PrecisionParams):
    group_size: int = param(16, ge=1, help="values sharing one scale in the stored activations (paper: 16)")
    min_numel: int = param(4096, ge=1, help="saved tensors smaller than this stay in their own dtype")

    mode: ClassVar[str] = "coat"


@register("optimizer", "adamw_fp8", builder="effitrain.optim.fp8_state:build_adamw_fp8",
          summary="AdamW with both moments stored in FP8 E4M3, one scale per block (torchao.optim.AdamWFp8)")
@dataclass
class AdamWFp8Params:
    lr: float = param(3e-3, gt=0)
    weight_decay: float = param(0.1, ge=0, help="decoupled decay on 2-D weights; biases and norms never decay")
    beta1: float = param(0.9, ge=0, lt=1)
    beta2: float = param(0.95, ge=0, lt=1)
    eps: float = param(1e-8, gt=0)
    block_size: int = param(256, ge=1, help="values sharing one FP8 scale (torchao default 256; COAT uses 128)")

    def validate(self, path: str) -> None:
        if not torchao_installed():
            raise ConfigError(f"{path}: optimizer=adamw_fp8 needs torchao, which is not installed "
                              f"(pip install 'effitrain[methods]'); use optimizer=adamw or optimizer=adamw_8bit")


FP8_PRECISIONS = ("fp8", "coat")


@rule("fp8_needs_sm89", "precision=fp8/coat need torchao and a CUDA GPU of compute capability >= 8.9 (FP8 matmuls)")
def _fp8_needs_sm89(spec, env):
    name = spec.block("precision").name
    if name not in FP8_PRECISIONS:
        return None
    if not torchao_installed():
        return f"precision={name} needs torchao, which is not installed (pip install 'effitrain[methods]')"
    if env.device_type is not None and env.device_type != "cuda":
        return (f"precision={name} needs a CUDA GPU of compute capability >= 8.9 (FP8 matmuls), this is a "
                f"{env.device_type} device; use precision=bf16 (or precision=auto)")
    if env.fp8_supported is False:
        return (f"precision={name} needs a GPU of compute capability >= 8.9 (Ada, Hopper or newer) for FP8 "
                f"matmuls; this GPU has none; use precision=bf16")
    return None


@rule("fp8_not_with_zero3", "precision=fp8/coat are not verified with ZeRO-3's partitioned parameters")
def _fp8_not_with_zero3(spec, env):
    name = spec.block("precision").name
    if name in FP8_PRECISIONS and spec.block("parallelism").params.stage == 3:
        return (f"precision={name} with ZeRO stage 3: torchao's float8 linears are not verified with DeepSpeed's "
                f"partitioned parameters; use parallelism=zero2 (or zero1, ddp)")
    return None
