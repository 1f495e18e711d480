"""The weight matrices of a decoder-only model, from its config dimensions alone (no torch, no model built).

Every parameter is listed as ``(name, shape)`` with the module names transformers uses (``model.layers.0.self_attn.
q_proj.weight``), so adapters and optimizers that select modules by name can be planned with the same patterns they
use on the real model.  Llama, Mistral and Qwen2 share one layout (Qwen2 adds q/k/v biases); GPT-NeoX fuses q, k, v
and uses LayerNorm with biases.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from effitrain.registry import ConfigError


@dataclass(frozen=True)
class ModelShape:
    arch: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    tied: bool
    head_dim: Optional[int] = None

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.head_dim or self.hidden // self.heads)

    @property
    def q_dim(self) -> int:
        return self.heads * (self.head_dim or self.hidden // self.heads)

    def parameters(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every parameter with its shape; a tied head is not listed (it is the embedding)."""
        h, i, v = self.hidden, self.intermediate, self.vocab
        if self.arch == "gpt_neox":
            out = [("gpt_neox.embed_in.weight", (v, h))]
            for n in range(self.layers):
                p = f"gpt_neox.layers.{n}."
                out += [(p + "input_layernorm.weight", (h,)), (p + "input_layernorm.bias", (h,)),
                        (p + "post_attention_layernorm.weight", (h,)), (p + "post_attention_layernorm.bias", (h,)),
                        (p + "attention.query_key_value.weight", (3 * h, h)),
                        (p + "attention.query_key_value.bias", (3 * h,)),
                        (p + "attention.dense.weight", (h, h)), (p + "attention.dense.bias", (h,)),
                        (p + "mlp.dense_h_to_4h.weight", (i, h)), (p + "mlp.dense_h_to_4h.bias", (i,)),
                        (p + "mlp.dense_4h_to_h.weight", (h, i)), (p + "mlp.dense_4h_to_h.bias", (h,))]
            out += [("gpt_neox.final_layer_norm.weight", (h,)), ("gpt_neox.final_layer_norm.bias", (h,))]
            return out + ([] if self.tied else [("embed_out.weight", (v, h))])
        q, kv = self.q_dim, self.kv_dim
        out = [("model.embed_tokens.weight", (v, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out += [(p + "self_attn.q_proj.weight", (q, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                    (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, q))]
            if self.arch == "qwen2":
                out += [(p + "self_attn.q_proj.bias", (q,)), (p + "self_attn.k_proj.bias", (kv,)),
                        (p + "self_attn.v_proj.bias", (kv,))]
            out += [(p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                    (p + "mlp.down_proj.weight", (h, i)),
                    (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
        out += [("model.norm.weight", (h,))]
        return out + ([] if self.tied else [("lm_head.weight", (v, h))])

    def count(self) -> int:
        return sum(numel(s) for _, s in self.parameters())


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def layer_index(name: str) -> Optional[int]:
    """The decoder layer a parameter belongs to (``...layers.3....`` -> 3), None for embeddings, norms, head."""
    parts = name.split(".")
    for a, b in zip(parts, parts[1:]):
        if a == "layers" and b.isdigit():
            return int(b)
    return None


def shape_from_block(name: str, params: Any) -> ModelShape:
    """The shape of the model block ``name`` with ``params``.  For a trained BPE the vocabulary is the configured
    size (the tokenizer trains to it on the demo corpus); a pretrained model is read from its local config.json."""
    if name in ("llama", "demo_base", "hf_arch"):
        arch = getattr(params, "arch", "llama")
        return ModelShape(arch=arch, vocab=params.vocab_size, hidden=params.hidden_size,
                          intermediate=params.intermediate_size, layers=params.num_layers, heads=params.num_heads,
                          kv_heads=(params.num_kv_heads or params.num_heads) if arch != "gpt_neox" else params.num_heads,
                          tied=bool(params.tie_word_embeddings) and arch != "gpt_neox")
    if name == "pretrained":
        return shape_from_hf_config(Path(params.path) / "config.json", vocab_override=params.vocab_size)
    raise ConfigError(f"check --memory: model={name} has no known shape; the planner knows model=llama, demo_base, "
                      f"hf_arch and pretrained (a local folder with config.json)")


_ARCHES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "gpt_neox": "gpt_neox"}


def shape_from_hf_config(path: Path, vocab_override: Optional[int] = None) -> ModelShape:
    """A transformers config.json of a Llama-style (llama, mistral, qwen2) or GPT-NeoX model."""
    if not path.is_file():
        raise ConfigError(f"model.path: the planner reads the model's config.json, and {path} is not a file "
                          f"(a hub name must be downloaded to a local folder first)")
    cfg = json.loads(path.read_text())
    arch = _ARCHES.get(cfg.get("model_type", ""))
    if arch is None:
        raise ConfigError(f"model.path: model_type {cfg.get('model_type')!r} in {path} is not one the planner "
                          f"knows; known: {', '.join(_ARCHES)}")
    heads = cfg["num_attention_heads"]
    return ModelShape(arch=arch, vocab=vocab_override or cfg["vocab_size"], hidden=cfg["hidden_size"],
                      intermediate=cfg["intermediate_size"], layers=cfg["num_hidden_layers"], heads=heads,
                      kv_heads=cfg.get("num_key_value_heads") or heads,
                      tied=bool(cfg.get("tie_word_embeddings", False)) and arch != "gpt_neox",
                      head_dim=cfg.get("head_dim"))
