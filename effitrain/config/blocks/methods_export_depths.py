"""Export every sub-model depth of a many-in-one model (``methods: {export_depths: {...}}``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from effitrain.config.rules import rule
from effitrain.registry import ConfigError, param, register


@register("method", "export_depths", builder="effitrain.methods.export_depths:build_export_depths",
          summary="At the end of training, save the sub-model of each listed depth as its own model folder "
                  "(Sorted LLaMA / SortedNet)")
@dataclass
class ExportDepthsParams:
    layers: list[int] = param(help="decoder depths (1-based) to save as final_model_depths/depth_K")

    def validate(self, path: str) -> None:
        if not self.layers or min(self.layers) < 1:
            raise ConfigError(f"{path}.layers: name the depths to export, counting decoder layers from 1")


@rule("sub_models_need_whole_layers", "objective.sample=one cuts the layer list per step and export_depths copies "
                                      "whole layers: ZeRO-3's partitioned parameters are refused")
def _sub_models_zero3(spec, env) -> Optional[str]:
    sampled = spec.block("objective").name == "layerwise" and spec.block("objective").params.sample == "one"
    exported = any(block.name == "export_depths" for block in spec.methods.values())
    if (sampled or exported) and spec.block("parallelism").params.stage == 3:
        return ("objective.sample=one and methods.export_depths work on whole decoder layers, which ZeRO-3 "
                "partitions; use parallelism=zero2 (or ddp)")
    return None
