"""Causal LMs of the common ``transformers`` families at any shape, initialised from scratch.

The presets under ``configs/model/`` (``pythia_160m``, ``qwen2_0_5b``, ``mistral_7b``, ``llama2_7b``) give the
published shapes; tests/test_model_families.py counts their parameters on the meta device against the published
totals.  To continue from published *weights* instead, use ``model=pretrained model.path=FOLDER_OR_ID``.
"""

from __future__ import annotations

from typing import Any


def family_config(params: Any, vocab_size: int, *, bos: Any = None, eos: Any = None, pad: Any = None):
    from transformers import AutoConfig

    common = dict(vocab_size=vocab_size, hidden_size=params.hidden_size, num_hidden_layers=params.num_layers,
                  num_attention_heads=params.num_heads, intermediate_size=params.intermediate_size,
                  max_position_embeddings=params.max_position_embeddings, rope_theta=params.rope_theta,
                  tie_word_embeddings=params.tie_word_embeddings, bos_token_id=bos, eos_token_id=eos,
                  pad_token_id=pad)
    if params.arch == "gpt_neox":
        common.update(rotary_pct=params.rotary_pct, rotary_emb_base=params.rope_theta, use_parallel_residual=True)
    else:
        common["num_key_value_heads"] = params.num_kv_heads or params.num_heads
    if params.arch in ("mistral", "qwen2"):
        common["sliding_window"] = params.sliding_window
        if params.arch == "qwen2":
            common["use_sliding_window"] = params.sliding_window is not None
    config = AutoConfig.for_model(params.arch, **common)
    config._attn_implementation = params.attn_implementation
    return config


def build_family(params: Any, *, tokenizer: Any, run: Any = None):
    from transformers import AutoModelForCausalLM

    config = family_config(params, len(tokenizer), bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id,
                           pad=tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=params.attn_implementation)
    from effitrain.models.switches import apply_model_switches

    return apply_model_switches(model, params)
