"""Wrapping a model with a `peft` config: what every adapter block (LoRA and its family, QLoRA, the MAM adapter)
shares, in the lowest file of the package so that the blocks and the final-model export all import it from below."""

from __future__ import annotations

from typing import Any

import torch


def peft_package() -> Any:
    try:
        import peft
    except ImportError as exc:
        raise RuntimeError("peft adapters need the `peft` package (pip install peft)") from exc
    return peft


def wrap_model(model: torch.nn.Module, config: Any) -> torch.nn.Module:
    peft = peft_package()
    try:
        return peft.get_peft_model(model, config)
    except ValueError as exc:  # e.g. target modules not found: say which block, keep peft's own explanation
        from effitrain.registry import ConfigError
        raise ConfigError(f"peft: {str(exc).splitlines()[0]}") from None
