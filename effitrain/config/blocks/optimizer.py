"""Optimizer block: a torch optimizer over the model's trainable parameters."""

from __future__ import annotations

from dataclasses import dataclass

from effitrain.registry import param, register


@register("optimizer", "adamw", builder="effitrain.optim.adamw:build_adamw",
          summary="torch.optim.AdamW, no decay on biases and norms (Loshchilov & Hutter, 1711.05101)")
@dataclass
class AdamWParams:
    lr: float = param(3e-3, ge=0, help="0 leaves every weight as it is: a stage that only evaluates the model "
                                       "a transform handed it (LoRAM's recovered full model)")
    weight_decay: float = param(0.1, ge=0)
    beta1: float = param(0.9, ge=0, lt=1)
    beta2: float = param(0.95, ge=0, lt=1)
    eps: float = param(1e-8, gt=0)
    fused: bool = param(False, help="torch's fused kernel (GPU)")
    per_layer_updates: bool = param(False, help="step each parameter inside the backward pass and free its "
                                                "gradient (GaLore's per-layer weight updates); needs grad_accum 1, "
                                                "no clipping, ZeRO 0, one process")
