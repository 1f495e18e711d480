"""Model transforms between stages: a ``save_pretrained`` folder in, a ``transformers`` model out.

Each builder is called as ``builder(params, source_dir)`` and returns ``(model, info)``; ``info`` (JSON-able) is kept
in the stage's row of the pipeline summary.  The pipeline saves the model, with the source's tokenizer, as the
folder the next stage loads (effitrain/pipeline.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from effitrain.registry import ConfigError


def _load(source: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(source), torch_dtype=torch.float32)


def decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The ``ModuleList`` of transformer blocks (``model.layers`` in Llama/Qwen2/Mistral, ``gpt_neox.layers``):
    the one list whose length is the config's ``num_hidden_layers``."""
    depth = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == depth:
            return name, module
    raise ConfigError(f"transform: cannot find the {depth} transformer blocks of a {type(model).__name__} "
                      f"(model_type {getattr(model.config, 'model_type', '?')})")


def stack_layers(params: Any, source: Path) -> tuple[Any, dict[str, Any]]:
    """G_stack (Du et al. 2024, "Stacking Your Transformers", 2405.15319): the grown model's layer ``i`` is a copy of
    the trained layer ``order[i]``, by default ``[0..L-1]`` repeated ``factor`` times (the authors' ``stacking_list``
    in tongxuluo/prts, e.g. 6 -> 24 layers); embeddings, final norm and LM head are copied unchanged.  The optimizer
    state is not carried over: the grown model starts a fresh run, as in the paper."""
    from transformers import AutoModelForCausalLM

    small = _load(source)
    prefix, layers = decoder_layers(small)
    depth = len(layers)
    order = list(params.order) if params.order is not None else list(range(depth)) * params.factor
    if max(order) >= depth:
        raise ConfigError(f"transform.order: source layer {max(order)} does not exist; the model has {depth} layers "
                          f"(0..{depth - 1})")
    config = small.config.__class__.from_dict(small.config.to_dict())
    config.num_hidden_layers = len(order)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == depth:  # per-layer attention kinds follow the copies
        config.layer_types = [layer_types[j] for j in order]
    grown = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)

    source_state = small.state_dict()
    state: dict[str, torch.Tensor] = {}
    marker = prefix + "."
    for key, tensor in source_state.items():
        if not key.startswith(marker):
            state[key] = tensor
            continue
        index, rest = key[len(marker):].split(".", 1)
        for new_index, source_index in enumerate(order):
            if source_index == int(index):
                state[f"{marker}{new_index}.{rest}"] = tensor.clone()
    missing, unexpected = grown.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in _tied_keys(grown)]
    if missing or unexpected:
        raise RuntimeError(f"stack_layers: state mismatch (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return grown, {"from_layers": depth, "to_layers": len(order), "order": order}


def _tied_keys(model: torch.nn.Module) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or []
    return set(tied if isinstance(tied, (list, tuple, set)) else tied.keys())


def densify(params: Any, source: Path) -> tuple[Any, dict[str, Any]]:
    """Sparse -> dense (SPDF's second phase): every weight trains again.  A folder written by ``save_pretrained``
    holds plain tensors, so a sparsity that was held by a mask during training arrives as zeros; anything still
    re-parameterised (``torch.nn.utils.prune`` or ``parametrize``) is folded into a plain weight.  The share of zero
    weights in the linear layers is reported, so the stage summary shows the sparsity that was handed on."""
    from torch.nn.utils import parametrize, prune

    model = _load(source)
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(module, hook._tensor_name)
    zeros = total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
    return model, {"linear_zero_fraction": zeros / max(total, 1)}


def merge_adapters(params: Any, source: Path) -> tuple[Any, dict[str, Any]]:
    """Fold the adapter a stage trained (``final_model/adapter``) into its base: ``W + scale * B A`` for LoRA and its
    relatives, through peft's ``merge_and_unload``.  Prompt-learning adapters (prefixes) cannot be folded."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    adapter = source / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise ConfigError(f"transform merge_adapters: {source} holds no adapter (no adapter/adapter_config.json); "
                          f"the previous stage trained no peft adapter")
    config = PeftConfig.from_pretrained(str(adapter))
    if config.is_prompt_learning:
        raise ConfigError(f"transform merge_adapters: a {config.peft_type} adapter adds computation and cannot be "
                          f"folded into weights")
    base_path = config.base_model_name_or_path
    try:
        base = AutoModelForCausalLM.from_pretrained(base_path, torch_dtype=torch.float32)
    except OSError as exc:
        raise ConfigError(f"transform merge_adapters: cannot load the adapter's base '{base_path}': "
                          f"{str(exc).splitlines()[0]}") from None
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    export = source / "effitrain_export.json"
    info = json.loads(export.read_text()) if export.is_file() else {}
    return merged, {"base": str(base_path), "peft_type": info.get("peft_type") or [str(config.peft_type)]}
