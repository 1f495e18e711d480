"""Parallelism block: the DeepSpeed ZeRO section.  Scale changes this block, not the code."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from effitrain.registry import ConfigError, param, register


@register("parallelism", "zero", builder="effitrain.parallel.zero:build_zero",
          summary="Data parallel with DeepSpeed ZeRO stage 0-3 and optional CPU offload")
@dataclass
class ZeroParams:
    stage: int = param(0, ge=0, le=3)
    offload_optimizer: Literal["none", "cpu"] = "none"
    offload_param: Literal["none", "cpu"] = "none"
    overlap_comm: bool = False
    contiguous_gradients: bool = True
    reduce_bucket_size: int = param(50_000_000, ge=1)
    allgather_bucket_size: int = param(50_000_000, ge=1)
    sequence_parallel_size: int = param(1, ge=1, help="DeepSpeed-Ulysses: processes that split each sequence "
                                        "(1 = off); see rules ulysses_* (effitrain rules)")

    def validate(self, path: str) -> None:
        if self.offload_optimizer != "none" and self.stage == 0:
            raise ConfigError(f"{path}.offload_optimizer: optimizer offload needs stage >= 1, got stage 0")
        if self.offload_param != "none" and self.stage != 3:
            raise ConfigError(f"{path}.offload_param: parameter offload needs stage 3, got stage {self.stage}")
