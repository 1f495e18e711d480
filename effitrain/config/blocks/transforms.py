"""Model transforms applied between the stages of a pipeline (``transform:`` of a stage entry).

A transform takes the folder of the model a stage starts from (``save_pretrained`` format) and returns a new
``transformers`` model, which the pipeline saves as the stage's starting model.  It runs once, on rank 0, before the
stage is launched; the stage itself is an ordinary run of a ``pretrained`` model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

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

    def check_shape(self, shape: Any, path: str) -> Any:
        """Every copied layer must exist in the model the stage receives; the grown model has len(order) layers."""
        if shape.layers is None:
            return shape.replace(layers=len(self.order) if self.order is not None else None)
        if self.order is not None and max(self.order) >= shape.layers:
            raise ConfigError(f"{path}.order: source layer {max(self.order)} does not exist; {shape.source} has "
                              f"{shape.layers} layers (0..{shape.layers - 1})")
        return shape.replace(layers=len(self.order) if self.order is not None else shape.layers * self.factor)


@register("transform", "densify", builder="effitrain.models.transforms:densify",
          summary="Sparse -> dense: drop sparsity masks/re-parameterisations so every weight trains again (SPDF)")
@dataclass
class DensifyParams:
    pass


@register("transform", "merge_adapters", builder="effitrain.models.transforms:merge_adapters",
          summary="Fold a stage's LoRA-family adapter into its base weights (peft merge_and_unload)")
@dataclass
class MergeAdaptersParams:
    def check_shape(self, shape: Any, path: str) -> Any:
        """The stage before must have trained an adapter that folds into weights (LoRA and its relatives)."""
        from effitrain.config.stage_shapes import MERGEABLE

        if shape.adapter != MERGEABLE:
            what = (f"a {shape.adapter_name} adapter, which adds computation and cannot be folded into weights"
                    if shape.adapter else f"no adapter (peft={shape.adapter_name or 'none'})")
            raise ConfigError(f"{path}: merge_adapters folds the adapter of the stage before, but {shape.source} "
                              f"has {what}; train that stage with peft=lora (or dora, pissa, ia3, qlora), or drop "
                              f"the transform")
        return shape


@register("transform", "upcycle_moe", builder="effitrain.models.moe_upcycle:upcycle_moe",
          summary="Dense -> MoE: every MLP becomes num_experts copies of itself behind a new top-k router "
                  "(Sparse Upcycling 2212.05055; AquilaMoE 2408.06567)")
@dataclass
class UpcycleMoEParams:
    num_experts: int = param(8, ge=2, help="experts per layer (AquilaMoE: 8; Sparse Upcycling: 32)")
    top_k: int = param(2, ge=1, help="experts per token (AquilaMoE: 2; Sparse Upcycling: 2 for decoders)")
    aux_loss_coef: float = param(0.01, ge=0, help="weight of the router's load-balancing loss (Switch/Mixtral: 0.01; "
                                                  "AquilaMoE: 0.001)")
    z_loss_coef: float = param(0.0, ge=0, help="weight of the router z-loss (ST-MoE), summed over the MoE layers and "
                                               "added by objective causal_lm (AquilaMoE: 0.01; 0 = none, as Mixtral)")
    router_std: float = param(0.02, gt=0, help="std of the new router's normal initialisation")
    seed: int = param(0, help="seed of the router's initialisation")

    def validate(self, path: str) -> None:
        if self.top_k > self.num_experts:
            raise ConfigError(f"{path}.top_k: {self.top_k} is more than num_experts ({self.num_experts}); a token "
                              f"is routed to top_k of the experts")


@dataclass
class _Levels:
    """What a coalescing halves, and what de-coalescing must therefore double (the same for both transforms)."""
    width: bool = param(True, help="hidden size, heads, key/value heads and MLP width (channel c with c + n/2, the "
                                   "authors' scheme)")
    depth: bool = param(True, help="the layers (layer i with i + L/2, the authors' depth_scheme)")

    def validate(self, path: str) -> None:
        if not (self.width or self.depth):
            raise ConfigError(f"{path}: width and depth are both false; the transform would change nothing")


@register("transform", "coalesce", builder="effitrain.models.vcycle:coalesce",
          summary="Multi-level training: merge a model's channels/heads and layers in pairs into one of half the "
                  "width and depth (Zou et al., 2404.07999)")
@dataclass
class CoalesceParams(_Levels):
    def check_source(self, spec: Any, path: str) -> None:
        """Halving needs even sizes: checked here when the source model is built from config (llama-style model
        blocks); a pretrained source is checked when the transform loads it."""
        model = spec.block("model").params
        if not hasattr(model, "num_layers"):
            return
        sizes = []
        if self.width:
            sizes += [("hidden_size", model.hidden_size), ("num_heads", model.num_heads),
                      ("num_kv_heads", model.num_kv_heads or model.num_heads),
                      ("intermediate_size", model.intermediate_size)]
        if self.depth:
            sizes.append(("num_layers", model.num_layers))
        odd = [f"model.{name}={value}" for name, value in sizes if value % 2]
        if odd:
            raise ConfigError(f"{path}: coalesce halves the model and needs even sizes; the stage before has "
                              f"{', '.join(odd)}")

    def check_shape(self, shape: Any, path: str) -> Any:
        if self.depth and shape.layers is not None:
            if shape.layers % 2:
                raise ConfigError(f"{path}: coalesce halves the layers and needs an even number; {shape.source} has "
                                  f"{shape.layers}")
            return shape.replace(layers=shape.layers // 2)
        return shape


@register("transform", "decoalesce_interpolate", builder="effitrain.models.vcycle:decoalesce_interpolate",
          summary="Multi-level training: de-coalesce a trained small model to the large shape and interpolate it "
                  "with the large model of an earlier stage (Zou et al., 2404.07999)")
@dataclass(kw_only=True)
class DecoalesceInterpolateParams(_Levels):
    reference: str = param(help="the large model to interpolate with: '@stage:NAME' (the stage before the "
                                "coalescing) or a save_pretrained folder")
    alpha: float = param(0.5, ge=0, le=1, help="weight of the de-coalesced model: (1 - alpha) * reference + alpha * "
                                               "decoalesced (the authors' scripts: 0.5)")

    def check_shape(self, shape: Any, path: str) -> Any:
        return shape.replace(layers=shape.layers * 2) if self.depth and shape.layers is not None else shape


# config.json fields that fix every weight's shape: two models whose values differ cannot share a diff vector
ARCHITECTURE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                       "intermediate_size", "vocab_size", "tie_word_embeddings")


def architecture_mismatch(config: dict, target: dict) -> Optional[str]:
    """The first shape-defining field of ``config.json`` in which ``config`` differs from ``target``, as
    ``"field X (target Y)"``, or None.  Torch-free: validation compares folders that exist before the run."""
    for field in ARCHITECTURE_FIELDS:
        if config.get(field) != target.get(field):
            return f"{field} {config.get(field)!r} (the target base has {target.get(field)!r})"
    return None


@register("transform", "add_diff_vector", builder="effitrain.models.diff_vector:add_diff_vector",
          summary="Fine-tuning transfer: add the diff vector finetuned - base of one base version to the stage's "
                  "model, another version of that base (Lin et al., 2503.20110)")
@dataclass(kw_only=True)
class AddDiffVectorParams:
    finetuned: str = param(help="the fine-tuned model of the other version: '@stage:NAME' or a save_pretrained folder")
    base: str = param(help="the base it was fine-tuned from: '@stage:NAME' or a save_pretrained folder")
    scale: float = param(1.0, gt=0, help="lambda in target + lambda * (finetuned - base) (the authors' default: 1)")

    def validate(self, path: str) -> None:
        """Two folders that exist now (a user's own checkpoints) are compared here, torch-free; the target base and
        models of earlier stages are compared when the transform runs."""
        from effitrain.config.inputs import model_config_json

        configs = {}
        for key in ("finetuned", "base"):
            value = getattr(self, key)
            if not value.strip():
                raise ConfigError(f"{path}.{key}: empty; give '@stage:NAME' or a save_pretrained folder")
            if not value.startswith("@stage:"):
                configs[key] = model_config_json(value)
                if configs[key] is None:
                    raise ConfigError(f"{path}.{key}: '{value}' is not a save_pretrained model folder (no readable "
                                      f"config.json)")
        if len(configs) == 2:
            why = architecture_mismatch(configs["finetuned"], configs["base"])
            if why:
                raise ConfigError(f"{path}.finetuned: '{self.finetuned}' is not a fine-tuned copy of the base "
                                  f"'{self.base}': {why.replace('the target base', 'the base')}; a diff vector "
                                  f"needs the same architecture")

    def check_init_folder(self, folder: str, path: str) -> None:
        """The stage's own model (the target base) against the two folders, when all exist before the run."""
        from effitrain.config.inputs import model_config_json

        target = model_config_json(folder)
        if target is None:
            return  # the input checks name a missing or unreadable folder
        for key in ("finetuned", "base"):
            value = getattr(self, key)
            config = None if value.startswith("@stage:") else model_config_json(value)
            why = config is not None and architecture_mismatch(config, target)
            if why:
                raise ConfigError(f"{path}.{key}: '{value}' differs from the stage's model '{folder}' (the target "
                                  f"base) in {why}; a diff vector needs the same architecture")
