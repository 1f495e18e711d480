"""The multi-level training framework's operators (Zou, Zhang, Deng, "A Multi-Level Framework for Accelerating
Training Transformer Models", ICLR 2024, arXiv 2404.07999), as model transforms between the stages of a V-cycle:
``coalesce`` (a large model to one of half the width and/or depth) and ``decoalesce_interpolate`` (back to the large
shape, then interpolated with the large model an earlier stage trained).

The operators follow the authors' ``map_tools`` (Photooon/Multi-Level-Training-Framework), written for Llama-family
``transformers`` models instead of GPT-2/BERT:

* **Width** (factor 2): channel ``c`` of every space (hidden, attention heads x head_dim, key/value heads x head_dim,
  MLP) is merged with channel ``c + n/2`` -- their default scheme and their config ``L6-H6.json``: head ``i`` with head
  ``i + H/2``, so head_dim is unchanged and, with grouped-query attention, a merged query head still reads its merged
  key/value head.  A weight's output rows are *averaged* in pairs and its input columns *summed*
  (``W' = F W norm(F^T)``, F row-normalised); norms' scales are averaged; the token embedding's columns are summed
  (averaged, then x2, as their GPT-2 mapper does).
* **Depth** (factor 2): layer ``i`` is merged with layer ``i + L/2`` (their ``depth_scheme``) by averaging every tensor.
* **De-coalescing** is the transpose map: rows duplicated, input columns duplicated and halved, the embedding's
  columns duplicated and halved, norms duplicated, layer ``j`` of the large model a copy of layer ``j mod L/2``.  So
  ``coalesce(decoalesce(small)) == small`` exactly, and ``decoalesce(coalesce(large))`` is ``large`` averaged over
  each merged pair (what the tests check by hand).
* **Interpolation** (their ``interpolate``): every tensor becomes ``(1 - alpha) * large + alpha * decoalesced`` where
  ``large`` is the reference model (the stage before the coalescing, ``@stage:NAME``); the authors' scripts use
  ``alpha = 0.5``.

Each builder is ``builder(params, source_dir) -> (model, info)`` (effitrain/models/transforms.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from effitrain.registry import ConfigError

_LAYER = "model.layers."


def _load(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


# ------------------------------------------------------------------------------------------------ pair operators
def _halves(t: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = t.shape[dim]
    if n % 2:
        raise ConfigError(f"transform coalesce: a dimension of {n} cannot be halved")
    return t.narrow(dim, 0, n // 2), t.narrow(dim, n // 2, n // 2)


def merge_mean(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Channel c and c + n/2 averaged (an output dimension, a norm's scale)."""
    a, b = _halves(t, dim)
    return (a + b) / 2


def merge_sum(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Channel c and c + n/2 summed (an input dimension: the merged channel carries both)."""
    a, b = _halves(t, dim)
    return a + b


def split_copy(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Each channel duplicated into c and c + n (the transpose of merge_mean's pairing)."""
    return torch.cat([t, t], dim=dim)


def split_half(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Each channel duplicated and halved (the input side: the two copies together carry it once)."""
    return torch.cat([t, t], dim=dim) / 2


# which dimensions of a Llama-family tensor are "out" (rows, averaged / copied) and "in" (columns, summed / halved)
_OUT_IN = {"q_proj": (0, 1), "k_proj": (0, 1), "v_proj": (0, 1), "o_proj": (0, 1),
           "gate_proj": (0, 1), "up_proj": (0, 1), "down_proj": (0, 1)}
_NORMS = ("input_layernorm", "post_attention_layernorm", "model.norm")


def _width_op(key: str, t: torch.Tensor, *, coalesce: bool) -> torch.Tensor:
    out_op, in_op = (merge_mean, merge_sum) if coalesce else (split_copy, split_half)
    if key == "model.embed_tokens.weight" or key == "lm_head.weight":
        # vocabulary x hidden: the hidden columns are what the model reads or writes; the authors' GPT-2 mapper
        # averages then doubles them (a sum) when coalescing and halves the copies when de-coalescing
        return (merge_sum if coalesce else split_half)(t, 1)
    if any(norm in key for norm in _NORMS) and key.endswith(".weight"):
        return out_op(t, 0)
    module = key.rsplit(".", 2)[-2] if key.count(".") >= 2 else ""
    if module in _OUT_IN:
        if key.endswith(".bias"):
            return out_op(t, 0)
        return in_op(out_op(t, 0), 1)
    raise ConfigError(f"transform coalesce: no width rule for the tensor '{key}' (shape {tuple(t.shape)}); the "
                      f"operators cover Llama-family models (llama, mistral, qwen2)")


def _layer_of(key: str) -> tuple[int, str] | None:
    if not key.startswith(_LAYER):
        return None
    index, rest = key[len(_LAYER):].split(".", 1)
    return int(index), rest


def _depth(state: dict[str, torch.Tensor], layers: int, *, coalesce: bool) -> dict[str, torch.Tensor]:
    """Layer i merged with i + L/2 by averaging (coalesce), or layer j copied from j mod L/2 (de-coalesce)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        where = _layer_of(key)
        if where is None:
            out[key] = tensor
            continue
        index, rest = where
        if coalesce:
            if index < layers // 2:
                out[f"{_LAYER}{index}.{rest}"] = (tensor + state[f"{_LAYER}{index + layers // 2}.{rest}"]) / 2
        else:
            out[f"{_LAYER}{index}.{rest}"] = tensor.clone()
            out[f"{_LAYER}{index + layers}.{rest}"] = tensor.clone()
    return out


def map_state(state: dict[str, torch.Tensor], *, layers: int, width: bool, depth: bool,
              coalesce: bool) -> dict[str, torch.Tensor]:
    """The coalesced (or de-coalesced) state dict; ``layers`` is the source model's depth."""
    mapped = {k: (_width_op(k, t, coalesce=coalesce) if width else t.clone()) for k, t in state.items()}
    return _depth(mapped, layers, coalesce=coalesce) if depth else mapped


# ------------------------------------------------------------------------------------------------ configs
def _check_shape(config: Any, *, width: bool, depth: bool) -> None:
    model_type = getattr(config, "model_type", "?")
    if model_type not in ("llama", "mistral", "qwen2"):
        raise ConfigError(f"transform coalesce: the operators are written for llama, mistral and qwen2 models, not "
                          f"{model_type}")
    checks = []
    if width:
        checks += [("hidden_size", config.hidden_size), ("num_attention_heads", config.num_attention_heads),
                   ("num_key_value_heads", config.num_key_value_heads),
                   ("intermediate_size", config.intermediate_size)]
    if depth:
        checks.append(("num_hidden_layers", config.num_hidden_layers))
    odd = [f"{name}={value}" for name, value in checks if value % 2]
    if odd:
        raise ConfigError(f"transform coalesce: halving needs even sizes; the model has {', '.join(odd)}")


def _resized(config: Any, *, width: bool, depth: bool, factor: float) -> Any:
    new = config.__class__.from_dict(config.to_dict())
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if width:
        for name in ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size"):
            setattr(new, name, int(getattr(config, name) * factor))
        new.head_dim = head_dim   # heads are merged, not narrowed
    if depth:
        new.num_hidden_layers = int(config.num_hidden_layers * factor)
        layer_types = getattr(config, "layer_types", None)
        if isinstance(layer_types, list):
            new.layer_types = (layer_types[:new.num_hidden_layers] if factor < 1
                               else layer_types * 2)[:new.num_hidden_layers]
    return new


def _build(config: Any, state: dict[str, torch.Tensor], name: str) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"{name}: state mismatch (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model


def _state(model: Any) -> dict[str, torch.Tensor]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)   # the embedding, under a second name
    return state


def _params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------ the transforms
def coalesce(params: Any, source: Path) -> tuple[Any, dict[str, Any]]:
    """A model of half the width and/or half the depth whose weights merge the source's in pairs."""
    large = _load(source)
    _check_shape(large.config, width=params.width, depth=params.depth)
    state = map_state(_state(large), layers=large.config.num_hidden_layers, width=params.width,
                      depth=params.depth, coalesce=True)
    small = _build(_resized(large.config, width=params.width, depth=params.depth, factor=0.5), state, "coalesce")
    return small, {"width": params.width, "depth": params.depth, "from_params": _params(large),
                   "to_params": _params(small), "to_layers": small.config.num_hidden_layers,
                   "to_hidden_size": small.config.hidden_size}


def decoalesce_interpolate(params: Any, source: Path) -> tuple[Any, dict[str, Any]]:
    """The source (a coalesced model, trained) de-coalesced to the reference's shape, then every tensor
    ``(1 - alpha) * reference + alpha * decoalesced``."""
    small = _load(source)
    reference_dir = Path(params.reference)
    if not (reference_dir / "config.json").is_file():
        raise ConfigError(f"transform decoalesce_interpolate.reference: {reference_dir} holds no model (no "
                          f"config.json); name the stage before the coalescing, e.g. '@stage:large'")
    reference = _load(reference_dir)
    decoalesced_config = _resized(small.config, width=params.width, depth=params.depth, factor=2)
    shape = ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size", "num_hidden_layers")
    wrong = [f"{k} {getattr(decoalesced_config, k)} vs {getattr(reference.config, k)}" for k in shape
             if getattr(decoalesced_config, k) != getattr(reference.config, k)]
    if wrong:
        raise ConfigError(f"transform decoalesce_interpolate: the de-coalesced model would not have the reference's "
                          f"shape ({'; '.join(wrong)}); use the same width/depth as the coalescing")
    state = map_state(_state(small), layers=small.config.num_hidden_layers, width=params.width,
                      depth=params.depth, coalesce=False)
    large_state = _state(reference)
    alpha = params.alpha
    mixed = {k: (1 - alpha) * large_state[k] + alpha * v for k, v in state.items()}
    model = _build(reference.config, mixed, "decoalesce_interpolate")
    return model, {"alpha": alpha, "reference": str(reference_dir), "to_params": _params(model),
                   "width": params.width, "depth": params.depth}

