"""PEFT block: parameter-efficient adapters through `peft`."""

from __future__ import annotations

from dataclasses import dataclass

from effitrain.registry import register


@register("peft", "none", builder="effitrain.peft.none:build_none", summary="Full fine-tuning / pre-training")
@dataclass
class NoPeft:
    pass
