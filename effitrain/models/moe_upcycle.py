"""Dense -> mixture of experts by upcycling (Komatsuzaki et al., "Sparse Upcycling", 2212.05055; the Scale-Out step of
AquilaMoE's EfficientScale, 2408.06567): a model transform between stages.

Every decoder layer's dense MLP becomes a sparse MoE block of ``num_experts`` experts, each an exact copy of the
trained MLP (gate, up and down projections), with a new top-``k`` router initialised at random (normal, std
``router_std``; the router is the only new parameter).  Attention, norms, embeddings and the head are copied unchanged.
Because every expert is the same function and the router's top-``k`` weights are renormalised to sum to one, the
upcycled model computes exactly the dense model's output before training; training then lets the experts diverge.

The MoE model is a stock ``transformers`` Mixtral model (``MixtralForCausalLM``: a Llama decoder with a sparse MoE
block), so it trains on the same engine and saves and loads with ``save_pretrained`` / ``AutoModelForCausalLM``.
DeepSpeed's own MoE layer (``deepspeed.moe.layer.MoE``) is not used: its experts live in expert-parallel process
groups, and a model built from it has no ``transformers`` class to save to and reload from, which the next stage and
the export need.  The router's load-balancing loss (Switch/Mixtral form) is added to the training loss with the
coefficient ``aux_loss_coef`` through the model's own ``output_router_logits``; the objective logs it.  The router
z-loss (ST-MoE; AquilaMoE trains with 0.01 of it) is not Mixtral's: its weight ``z_loss_coef`` is stored in the
model's config as ``router_z_loss_coef``, and ``objective: causal_lm`` adds it from the router logits.

Mixtral renormalises the top-``k`` router probabilities to sum to one, where upcycling code weights the experts by
the raw softmax probabilities.  The renormalised form is kept (a stock class that saves and reloads, and an upcycled
model equal to the dense one at the start); docs/recipes/moe_upcycle.md states the difference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from effitrain.registry import ConfigError

UPCYCLABLE = ("llama", "mistral")   # a Llama-style decoder whose MLP is gate/up/down with SiLU: Mixtral's experts


def upcycle_moe(params: Any, source: Path) -> tuple[Any, dict[str, Any]]:
    from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
    cfg = dense.config
    if cfg.model_type not in UPCYCLABLE:
        raise ConfigError(f"transform.upcycle_moe: a {cfg.model_type} model cannot be upcycled; supported: "
                          f"{', '.join(UPCYCLABLE)} (Llama-style gate/up/down MLPs)")
    if params.top_k > params.num_experts:
        raise ConfigError(f"transform.top_k: {params.top_k} is more than num_experts ({params.num_experts})")
    if getattr(cfg, "mlp_bias", False) or getattr(cfg, "attention_bias", False):
        raise ConfigError("transform.upcycle_moe: the dense model has biases in its MLP or attention, which the "
                          "Mixtral architecture does not have")
    moe_config = MixtralConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=getattr(cfg, "head_dim", None),
        hidden_act=cfg.hidden_act, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_word_embeddings,
        rope_parameters=getattr(cfg, "rope_parameters", None), sliding_window=None,
        num_local_experts=params.num_experts, num_experts_per_tok=params.top_k,
        output_router_logits=True, router_aux_loss_coef=params.aux_loss_coef, router_jitter_noise=0.0,
        router_z_loss_coef=params.z_loss_coef,   # not Mixtral's own: kept in config.json, read by causal_lm
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
    moe_config._attn_implementation = getattr(cfg, "_attn_implementation", None) or "sdpa"
    moe = MixtralForCausalLM(moe_config).to(torch.float32)

    state: dict[str, torch.Tensor] = {}
    for key, tensor in dense.state_dict().items():
        if ".mlp." not in key:
            state[key] = tensor
    generator = torch.Generator().manual_seed(params.seed)
    for i, layer in enumerate(dense.model.layers):
        mlp = layer.mlp
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0)       # Mixtral's expert layout
        prefix = f"model.layers.{i}.mlp."
        state[prefix + "experts.gate_up_proj"] = gate_up.unsqueeze(0).repeat(params.num_experts, 1, 1).clone()
        state[prefix + "experts.down_proj"] = mlp.down_proj.weight.unsqueeze(0).repeat(params.num_experts, 1, 1).clone()
        state[prefix + "gate.weight"] = torch.randn(params.num_experts, cfg.hidden_size,
                                                    generator=generator) * params.router_std
    missing, unexpected = moe.load_state_dict(state, strict=False)
    tied = set(getattr(moe, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"upcycle_moe: state mismatch (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if cfg.tie_word_embeddings:
        moe.tie_weights()
    dense_params = sum(p.numel() for p in dense.parameters())
    total = sum(p.numel() for p in moe.parameters())
    return moe, {"num_experts": params.num_experts, "top_k": params.top_k, "dense_params": dense_params,
                 "total_params": total, "active_params": active_parameters(moe)}


def active_parameters(model: torch.nn.Module) -> int:
    """Parameters one token passes through: expert weights count ``top_k / num_experts`` of their size."""
    return int(sum(p.numel() * expert_share(model, name) for name, p in model.named_parameters()))


def expert_share(model: torch.nn.Module, name: str) -> float:
    cfg = getattr(model, "config", None)
    experts, top_k = getattr(cfg, "num_local_experts", None), getattr(cfg, "num_experts_per_tok", None)
    if experts and top_k and ".experts." in name:
        return top_k / experts
    return 1.0
