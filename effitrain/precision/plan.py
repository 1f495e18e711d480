"""What the precision block's builders return: the lowest file of the package, which every precision mode's module
(bf16/fp16 in build.py, FP8 in fp8.py) imports."""

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
