"""Replacing a model's ``nn.Linear`` layers by structured ones, and folding them back into ``nn.Linear`` for export:
the two moves every layer re-parameterisation block makes (Monarch, structured FFN)."""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from effitrain.optim.param_groups import module_matches
from effitrain.registry import ConfigError


def replace_linears(model: nn.Module, target_modules: list[str], make: Callable[[nn.Linear], nn.Module],
                    exclude: tuple[str, ...] = ()) -> int:
    """Replace every ``nn.Linear`` whose name matches ``target_modules`` (never the LM head, nor one whose name starts
    with a prefix in ``exclude``) by ``make(linear)``, in module order; returns how many were replaced."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and module is not head and module_matches(name, target_modules)
               and not name.startswith(exclude)]
    if not targets:
        raise ConfigError(f"peft.target_modules: no nn.Linear matches {target_modules}")
    for name, module in targets:
        set_module(model, name, make(module))
    return len(targets)


def fold_to_linears(model: nn.Module, kind: type, weight_of: Callable[[nn.Module], torch.Tensor]) -> nn.Module:
    """A copy of ``model`` in which every ``kind`` layer is the ``nn.Linear`` of ``weight_of(layer)`` (its bias, if
    any, kept): a stock model that ``save_pretrained`` writes and ``transformers`` loads."""
    folded = copy.deepcopy(model)
    for name, module in list(folded.named_modules()):
        if not isinstance(module, kind):
            continue
        bias = getattr(module, "bias", None)
        with torch.no_grad():
            weight = weight_of(module).detach()
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                               dtype=weight.dtype)
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)
        set_module(folded, name, linear)
    return folded


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``name`` of ``model`` (``model.layers.0.mlp.up_proj``)."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
