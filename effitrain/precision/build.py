"""Precision block -> the DeepSpeed mixed-precision section."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional


@dataclass(frozen=True)
class PrecisionPlan:
    mode: str                  # the resolved mode: fp32, bf16, fp16, fp8 or coat ("auto" is resolved here)
    ds_config: dict[str, Any]  # merged into the DeepSpeed config
    # applied to the built model before adapters and DeepSpeed (fp8: linears swapped for torchao's Float8Linear)
    prepare_model: Optional[Callable[[Any], Any]] = None
    hooks: tuple = ()          # engine hooks the precision needs (coat: FP8 storage of saved activations)


def build_precision(params, *, device_type: str, bf16_supported: bool) -> PrecisionPlan:
    mode = params.mode
    if mode == "auto":
        # bf16 is only a win where there are bf16 matrix units; on a CPU it is emulated and slower than fp32
        mode = "bf16" if device_type == "cuda" and bf16_supported else "fp32"
    if mode in ("fp8", "coat"):
        # FP8 only in the linears' matmuls; everything else (norms, softmax, master weights) is DeepSpeed bf16
        from effitrain.precision.fp8 import float8_plan

        section = {"bf16": {"enabled": True}}
        if params.grad_accum_dtype == "fp32":
            section["data_types"] = {"grad_accum_dtype": "fp32"}
        return float8_plan(params, section)
    if mode == "bf16":
        section: dict[str, Any] = {"bf16": {"enabled": True}}
        if params.grad_accum_dtype == "fp32":
            section["data_types"] = {"grad_accum_dtype": "fp32"}
        return PrecisionPlan(mode, section)
    if mode == "fp16":
        return PrecisionPlan(mode, {"fp16": {"enabled": True, "loss_scale": 0,
                                             "initial_scale_power": params.initial_scale_power,
                                             "loss_scale_window": params.loss_scale_window}})
    return PrecisionPlan("fp32", {})
