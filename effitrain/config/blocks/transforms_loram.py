"""LoRAM's two pipeline transforms (Zhang et al., 2502.13533): prune the model a LoRA stage trains on, and recover
that stage's adapter to the full model (effitrain.models.loram)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from effitrain.registry import ConfigError, param, register


@register("transform", "loram_prune", builder="effitrain.models.loram:loram_prune",
          summary="LoRAM: structured pruning of key/value head groups and FFN channels, the same share in every "
                  "layer (Zhang et al., 2502.13533)")
@dataclass
class LoramPruneParams:
    ratio: float = param(0.5, gt=0, lt=1, help="share of key/value head groups and of FFN channels removed per "
                                               "layer (the paper: 0.65 to 0.85 on LLaMA)")
    criterion: Literal["taylor", "l2", "random"] = param(
        "taylor", help="taylor: |w x dL/dw| summed over each coupled group on calibration rows (LLM-Pruner's "
                       "param_first, LoRAM-Stru's); l2: squared weights (LLM-Pruner's magnitude); random: LoRAM-Rand")
    calibration_samples: int = param(10, ge=1, help="taylor: rows of the demo corpus (LLM-Pruner: 10)")
    calibration_len: int = param(64, ge=2, help="taylor: tokens per row (LLM-Pruner: 64)")
    seed: int = param(0, help="seed of the calibration rows and of criterion random")


@register("transform", "loram_recover", builder="effitrain.models.loram:loram_recover",
          summary="LoRAM: scatter the pruned model's LoRA back into the full shapes (zeros where pruned) and merge "
                  "it into the full model (Zhang et al., 2502.13533)")
@dataclass(kw_only=True)
class LoramRecoverParams:
    full: str = param(help="the full model that was pruned: '@stage:NAME' (the stage before the pruning) or a "
                           "save_pretrained folder")

    def validate(self, path: str) -> None:
        from effitrain.config.inputs import model_config_json

        if not self.full.strip():
            raise ConfigError(f"{path}.full: empty; give '@stage:NAME' or a save_pretrained folder")
        if not self.full.startswith("@stage:") and model_config_json(self.full) is None:
            raise ConfigError(f"{path}.full: '{self.full}' is not a save_pretrained model folder (no readable "
                              f"config.json)")

    def check_shape(self, shape: Any, path: str) -> Any:
        """The stage before must have trained a LoRA-family adapter (on the pruned model) for there to be one to
        recover."""
        from effitrain.config.stage_shapes import MERGEABLE

        if shape.adapter != MERGEABLE:
            raise ConfigError(f"{path}: loram_recover recovers the LoRA adapter of the stage before, but "
                              f"{shape.source} has {'a ' + str(shape.adapter_name) + ' adapter' if shape.adapter else 'no adapter'}; "
                              f"train that stage with peft=lora")
        return shape
