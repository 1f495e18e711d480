"""Parallelism block -> the ``zero_optimization`` section of the DeepSpeed config."""

from __future__ import annotations

from typing import Any


def build_zero(params) -> dict[str, Any]:
    section: dict[str, Any] = {"stage": params.stage}
    if params.stage >= 1:
        section.update(overlap_comm=params.overlap_comm, contiguous_gradients=params.contiguous_gradients,
                       reduce_bucket_size=params.reduce_bucket_size,
                       allgather_bucket_size=params.allgather_bucket_size)
    if params.offload_optimizer != "none":
        section["offload_optimizer"] = {"device": params.offload_optimizer, "pin_memory": False}
    if params.offload_param != "none":
        section["offload_param"] = {"device": params.offload_param, "pin_memory": False}
    return section
