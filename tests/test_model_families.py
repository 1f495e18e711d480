"""The model family presets have the published shapes (parameter totals counted on the meta device, so nothing is
allocated), build and train from scratch at a tiny size, and a saved model without a tokenizer can train a BPE."""

from __future__ import annotations

import pytest
import torch

from effitrain.config.compose import compose_config
from effitrain.config.spec import validate

# Published totals: Pythia model card, Qwen2 config of Qwen/Qwen2-0.5B, Mistral 7B paper/model card, Llama 2 card.
PUBLISHED = {"pythia_160m": 162_322_944, "qwen2_0_5b": 494_032_768, "mistral_7b": 7_241_732_096,
             "llama2_7b": 6_738_415_616}


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_a_family_preset_has_its_published_parameter_count(preset):
    from transformers import AutoModelForCausalLM

    from effitrain.models.families import family_config

    params = validate(compose_config([f"model={preset}"]).cfg).block("model").params
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(family_config(params, params.vocab_size))
    assert type(model).__name__.lower().startswith(params.arch.replace("_", ""))
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[preset]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen2", "mistral", "gpt_neox"])
def test_a_family_trains_from_scratch_at_a_tiny_size(arch, tmp_path, train_in_process):
    summary = train_in_process(["model=qwen2_0_5b", f"model.arch={arch}", "model.hidden_size=64", "model.num_layers=2",
                                "model.num_heads=4", "model.num_kv_heads=2", "model.intermediate_size=128",
                                "model.vocab_size=512", "model.max_position_embeddings=256", "train.max_steps=2"],
                               tmp_path / "run", tiny_model=False)
    assert summary["finished"]
    from transformers import AutoConfig
    assert AutoConfig.from_pretrained(tmp_path / "run" / "final_model").model_type == arch


@pytest.mark.slow
def test_a_saved_model_without_a_tokenizer_trains_a_bpe_of_its_vocabulary(tmp_path, train_in_process):
    base = tmp_path / "base"
    train_in_process(["train.max_steps=1"], base)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (base / "final_model" / name).unlink(missing_ok=True)
    from conftest import effitrain_cli
    refused = effitrain_cli("check", "model=pretrained", f"model.path={base / 'final_model'}",
                            f"run_dir={tmp_path / 'x'}")
    assert refused.returncode == 2 and "model.tokenizer=bpe" in refused.stderr
    summary = train_in_process(["model=pretrained", f"model.path={base / 'final_model'}", "model.tokenizer=bpe",
                                "train.max_steps=1"], tmp_path / "run", tiny_model=False)
    assert summary["finished"] and summary["total_params"] > 0
