"""LISA: layerwise importance sampling (Pan et al., 2403.17919) as an engine method (``methods: {lisa: {...}}``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from effitrain.config.rules import rule
from effitrain.registry import param, register


@register("method", "lisa", builder="effitrain.methods.lisa:build_lisa",
          summary="LISA: train embeddings + head always and gamma random middle layers, resampled every K steps")
@dataclass
class LisaParams:
    active_layers: int = param(2, ge=1, help="gamma: decoder layers unfrozen at a time (paper/LMFlow: 2)")
    interval: int = param(20, ge=1, help="K: optimizer steps between re-sampling (LMFlow default: 20)")
    layers_path: Optional[str] = param(None, help="dotted path of the decoder layer list; null = find it "
                                                   "(model.layers, transformer.h, ...)")
    seed: Optional[int] = param(None, help="sampling seed; null = train.seed")


def _has_lisa(spec) -> bool:
    return any(block.name == "lisa" for block in spec.methods.values())


@rule("lisa_needs_unsharded_state",
      "LISA drops the optimizer state of layers that leave the active set: ZeRO stage >= 1 is refused")
def _lisa_zero(spec, env) -> Optional[str]:
    if not _has_lisa(spec):
        return None
    stage = spec.blocks["parallelism"].params.stage
    if stage >= 1:
        return (f"LISA freezes and unfreezes layers during training, but ZeRO stage {stage} builds flat optimizer "
                f"partitions once at start-up: frozen layers would keep being updated from zero-filled gradients "
                f"and their state cannot be dropped{' and ZeRO-3 also partitions the parameters' if stage == 3 else ''}. "
                f"Use parallelism=ddp (ZeRO stage 0); LISA already keeps only gamma layers' state")
    return None


@rule("lisa_full_model_only", "LISA trains the model's own layers: a peft adapter or transform is refused")
def _lisa_peft(spec, env) -> Optional[str]:
    if _has_lisa(spec) and spec.blocks["peft"].name != "none":
        return (f"LISA unfreezes whole decoder layers, but peft '{spec.blocks['peft'].name}' has frozen the base "
                f"model for its adapter. Use peft=none with LISA, or drop methods.lisa")
    return None
