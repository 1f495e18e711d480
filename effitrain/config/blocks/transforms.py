"""Model transforms applied between the stages of a pipeline (``transform:`` of a stage entry).

A transform takes the folder of the model a stage starts from (``save_pretrained`` format) and returns a new
``transformers`` model, which the pipeline saves as the stage's starting model.  It runs once, on rank 0, before the
stage is launched; the stage itself is an ordinary run of a ``pretrained`` model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from effitrain.registry import ConfigError, param, register


@register("transform", "stack_layers", builder="effitrain.models.transforms:stack_layers",
          summary="G_stack: stack the trained layers k times in depth (Du et al., 2405.15319)")
@dataclass
class StackLayersParams:
    factor: int = param(4, ge=2, help="growth factor g: the new model has g x L layers (paper: g = 4)")
    order: Optional[list[int]] = param(None, help="explicit source layer of every new layer (overrides factor); "
                                       "default: [0..L-1] repeated g times, the authors' stacking_list")

    def validate(self, path: str) -> None:
        if self.order is not None and (not self.order or min(self.order) < 0):
            raise ConfigError(f"{path}.order: expected a non-empty list of source layer indices (>= 0)")


@register("transform", "densify", builder="effitrain.models.transforms:densify",
          summary="Sparse -> dense: drop sparsity masks/re-parameterisations so every weight trains again (SPDF)")
@dataclass
class DensifyParams:
    pass


@register("transform", "merge_adapters", builder="effitrain.models.transforms:merge_adapters",
          summary="Fold a stage's LoRA-family adapter into its base weights (peft merge_and_unload)")
@dataclass
class MergeAdaptersParams:
    pass
