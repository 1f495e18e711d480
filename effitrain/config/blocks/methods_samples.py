"""Sample generations at evaluation time (``methods: {samples: {...}}``): what the model writes, next to its loss."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from effitrain.config.rules import rule
from effitrain.registry import param, register


@register("method", "samples", builder="effitrain.methods.samples:build_samples",
          summary="Greedy completions of a few prompts at every evaluation, in RUN_DIR/samples.jsonl")
@dataclass
class SamplesParams:
    prompts: list[str] = field(default_factory=lambda: ["def fibonacci(n):", "The purpose of this module is",
                                                         "Worksheet: 1-digit arithmetic\n3 + 4 ="])
    max_new_tokens: int = param(32, ge=1, le=4096)


@rule("samples_need_whole_weights", "methods.samples generates on rank 0: ZeRO stage 3's partitioned weights are "
                                    "refused")
def _samples_zero3(spec, env) -> Optional[str]:
    if any(b.name == "samples" for b in spec.methods.values()) and spec.block("parallelism").params.stage == 3:
        return "methods.samples generates on rank 0 alone, which ZeRO-3's partitioned weights cannot; use ZeRO <= 2"
    return None
