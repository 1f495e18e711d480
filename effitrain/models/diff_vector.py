"""Fine-tuning transfer (Lin et al. 2025, "Efficient Model Development through Fine-tuning Transfer", 2503.20110).

The diff vector of one base version, ``delta = theta_finetuned(v1) - theta_base(v1)``, is added to another version of
that base: ``theta(v2) + lambda * delta``, every tensor of the state dict (embeddings, norms and the LM head
included), in float64 and stored back in the target's dtype, as the authors' ``tools/run_transfer_finetuning.py``
does.  The three models must share one architecture: every shape-defining ``config.json`` field and every tensor's
name and shape; anything else is refused with one line naming the transform's key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from effitrain.registry import ConfigError


def _load(path: str | Path, key: str) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{key}: cannot load '{path}': {message}") from None


def transfer_state(target: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor],
                   base: dict[str, torch.Tensor], scale: float = 1.0) -> dict[str, torch.Tensor]:
    """``target + scale * (finetuned - base)`` per tensor (float64 arithmetic, the target's dtype kept).  The three
    state dicts must have the same names and shapes (checked by :func:`check_same_tensors` first)."""
    out = {}
    for name, weight in target.items():
        delta = finetuned[name].double() - base[name].double()
        out[name] = (weight.double() + scale * delta).to(weight.dtype)
    return out


def check_same_tensors(target: dict[str, torch.Tensor], other: dict[str, torch.Tensor], key: str,
                       path: str | Path, target_path: str | Path) -> None:
    """Refuse (one line naming ``key``) a model whose tensors differ from the target's by name or shape."""
    missing = sorted(set(target) - set(other))
    extra = sorted(set(other) - set(target))
    if missing or extra:
        name, side = (missing[0], "lacks") if missing else (extra[0], "has an extra")
        raise ConfigError(f"{key}: '{path}' {side} tensor {name} compared with the target base '{target_path}'; "
                          f"a diff vector needs the same architecture")
    for name, weight in target.items():
        if tuple(other[name].shape) != tuple(weight.shape):
            raise ConfigError(f"{key}: '{path}' has {name} of shape {tuple(other[name].shape)}, the target base "
                              f"'{target_path}' {tuple(weight.shape)}; a diff vector needs the same architecture")


def add_diff_vector(params: Any, source: Path) -> tuple[Any, dict[str, Any]]:
    """The stage's model (``source``: the new base version) plus ``scale * (finetuned - base)``."""
    from effitrain.config.blocks.transforms import architecture_mismatch

    target = _load(source, "transform")
    models = {key: _load(getattr(params, key), f"transform.{key}") for key in ("finetuned", "base")}
    for key, model in models.items():
        why = architecture_mismatch(model.config.to_dict(), target.config.to_dict())
        if why:
            raise ConfigError(f"transform.{key}: '{getattr(params, key)}' differs from the target base '{source}' "
                              f"in {why}; a diff vector needs the same architecture")
    # the tensors themselves (tied weights appear once per name, as state_dict lists them)
    target_state = target.state_dict()
    states = {key: model.state_dict() for key, model in models.items()}
    for key, state in states.items():
        check_same_tensors(target_state, state, f"transform.{key}", getattr(params, key), source)
    new_state = transfer_state(target_state, states["finetuned"], states["base"], params.scale)
    target.load_state_dict(new_state)
    with torch.no_grad():
        delta_norm = sum(float((states["finetuned"][n].double() - states["base"][n].double()).pow(2).sum())
                         for n in target_state) ** 0.5
    return target, {"finetuned": str(params.finetuned), "base": str(params.base), "scale": params.scale,
                    "tensors": len(new_state), "delta_l2_norm": delta_norm}
