"""Precision block -> the DeepSpeed mixed-precision section."""

from __future__ import annotations

from typing import Any

from effitrain.precision.plan import PrecisionPlan


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
