"""Modules that train with the model but are not part of it: FitNets' hint regressor (``objective: distill`` with
``hint``) is the first.

They live in one ``nn.ModuleDict`` child of the trained model, named :data:`CHILD`, so that they need nothing of
their own from the engine: the optimizer sees their parameters (they are attached before it is built), DeepSpeed
reduces, clips and checkpoints them with the model's, and a resumed run gets them back.  What leaves the run does
not carry them: :func:`detached` hides the child while ``final_model/`` is written, and :func:`strip_state` drops
their keys from a checkpoint's state when ``effitrain export`` loads it into a model built from the config.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch

CHILD = "training_only"


def attach(model: torch.nn.Module, name: str, module: torch.nn.Module) -> torch.nn.Module:
    """Add ``module`` to the model's training-only child as ``name`` (the child is created on first use)."""
    holder = getattr(model, CHILD, None)
    if holder is None:
        holder = torch.nn.ModuleDict()
        model.add_module(CHILD, holder)
    holder[name] = module
    return module


@contextmanager
def detached(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The model without its training-only child for the duration (e.g. of ``save_pretrained``), then with it."""
    holder = model._modules.pop(CHILD, None)
    try:
        yield model
    finally:
        if holder is not None:
            model._modules[CHILD] = holder


def strip_state(state: dict[str, Any]) -> dict[str, Any]:
    """A state dict without the training-only modules' entries."""
    prefix = CHILD + "."
    return {k: v for k, v in state.items() if not k.startswith(prefix)}
