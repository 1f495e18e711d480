"""Precision block: the DeepSpeed mixed-precision section."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from effitrain.config.rules import rule
from effitrain.registry import param, register


@dataclass
class _PrecisionParams:
    initial_scale_power: int = param(16, ge=0, le=32, help="fp16 only: initial loss scale 2**power")
    loss_scale_window: int = param(1000, ge=1, help="fp16 only")
    grad_accum_dtype: Literal["auto", "fp32"] = param("auto", help="bf16: accumulate gradients in fp32")

    mode: ClassVar[str]


@register("precision", "auto", builder="effitrain.precision.build:build_precision",
          summary="bf16 where the device supports it, else fp32")
@dataclass
class AutoPrecision(_PrecisionParams):
    mode: ClassVar[str] = "auto"


@register("precision", "fp32", builder="effitrain.precision.build:build_precision", summary="Full fp32")
@dataclass
class Fp32Precision(_PrecisionParams):
    mode: ClassVar[str] = "fp32"


@register("precision", "bf16", builder="effitrain.precision.build:build_precision",
          summary="bf16 weights and activations, fp32 master weights and optimizer state (DeepSpeed bf16)")
@dataclass
class Bf16Precision(_PrecisionParams):
    mode: ClassVar[str] = "bf16"


@register("precision", "fp16", builder="effitrain.precision.build:build_precision",
          summary="fp16 with dynamic loss scaling (GPU only)")
@dataclass
class Fp16Precision(_PrecisionParams):
    mode: ClassVar[str] = "fp16"


@rule("fp16_needs_gpu", "fp16 mixed precision runs only on a CUDA device (DeepSpeed's CPU backend has no fp16)")
def _fp16_needs_gpu(spec, env):
    if spec.block("precision").name == "fp16" and env.device_type not in (None, "cuda"):
        return (f"precision=fp16 needs a CUDA GPU, this is a {env.device_type} device; "
                f"use precision=bf16 or precision=fp32 (or precision=auto)")
    return None


@rule("bf16_needs_support", "bf16 needs a device that supports it (Ampere or newer GPUs, or a CPU)")
def _bf16_needs_support(spec, env):
    if spec.block("precision").name == "bf16" and env.bf16_supported is False:
        return "precision=bf16: this device does not support bf16; use precision=fp16 or precision=auto"
    return None
