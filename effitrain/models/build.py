"""Model block builders.  Both return a plain `transformers` causal LM, so the final model saves with
``save_pretrained`` and loads back with ``AutoModelForCausalLM.from_pretrained``."""

from __future__ import annotations

from pathlib import Path

from effitrain.registry import ConfigError


def build_llama(params, *, tokenizer, run=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=params.hidden_size,
        num_hidden_layers=params.num_layers,
        num_attention_heads=params.num_heads,
        num_key_value_heads=params.num_kv_heads or params.num_heads,
        intermediate_size=params.intermediate_size,
        max_position_embeddings=params.max_position_embeddings,
        rope_theta=params.rope_theta,
        tie_word_embeddings=params.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation=params.attn_implementation,
    )
    model = LlamaForCausalLM(config)
    from effitrain.models.switches import apply_model_switches

    return apply_model_switches(model, params)


def build_pretrained(params, *, tokenizer, run=None):
    from transformers import AutoModelForCausalLM

    local = Path(params.path).expanduser()
    if (local.is_absolute() or params.path.startswith(".")) and not local.exists():
        raise ConfigError(f"model.path: '{params.path}' does not exist")
    kwargs = {"revision": params.revision, "trust_remote_code": params.trust_remote_code}
    if params.attn_implementation:
        kwargs["attn_implementation"] = params.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(str(local) if local.exists() else params.path, **kwargs)
    except (OSError, ValueError, KeyError) as exc:  # missing files; an unknown model_type; a config without one
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"model.path: cannot load '{params.path}': {message}") from None
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    from effitrain.models.switches import apply_model_switches

    return apply_model_switches(model, params)
