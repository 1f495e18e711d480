"""Dense -> MoE upcycling (transform upcycle_moe, recipe moe_upcycle).

The mechanism: every expert is a copy of the trained MLP, so before training the MoE model computes exactly the dense
model's logits whatever its new router does; parameters (total and active per token) and FLOPs per token follow the
hand formula; the load-balancing loss is part of the training loss and logged, never of the eval loss; the MoE model
saves and loads as a stock transformers model; a pipeline stopped inside its MoE stage resumes exactly.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from conftest import sigterm_after_step
from effitrain.models.moe_upcycle import active_parameters, upcycle_moe
from effitrain.registry import ConfigError

HIDDEN, INTER, LAYERS, VOCAB = 32, 64, 2, 300


def _dense_folder(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                                         num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                         tie_word_embeddings=True))
    folder = tmp_path / "dense"
    model.save_pretrained(folder)
    return model, folder


def _params(**kw):
    return SimpleNamespace(**{"num_experts": 4, "top_k": 2, "aux_loss_coef": 0.01, "z_loss_coef": 0.0,
                              "router_std": 0.02, "seed": 0, **kw})


def test_upcycled_experts_reproduce_the_dense_model_before_training(tmp_path):
    dense, folder = _dense_folder(tmp_path)
    moe, info = upcycle_moe(_params(router_std=1.0), folder)   # a strong random router: routing varies per token
    ids = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        routed = moe.model.layers[0].mlp.gate(moe.model.embed_tokens(ids))[2]
        assert len(torch.unique(routed)) > 2                       # tokens do go to different experts
        assert torch.allclose(moe(ids).logits, dense(ids).logits, atol=1e-5)
    assert type(moe).__name__ == "MixtralForCausalLM" and info["num_experts"] == 4


def test_parameters_and_flops_count_total_and_active_experts(tmp_path):
    from effitrain.engine.metrics import flops_per_token

    dense, folder = _dense_folder(tmp_path)
    moe, info = upcycle_moe(_params(), folder)
    mlp = 3 * HIDDEN * INTER                       # gate, up, down
    router = 4 * HIDDEN
    dense_total = sum(p.numel() for p in dense.parameters())
    assert info["total_params"] == sum(p.numel() for p in moe.parameters()) == dense_total + LAYERS * (3 * mlp + router)
    # one token runs top_k = 2 of 4 experts: the MLP weight twice, plus the router
    assert info["active_params"] == active_parameters(moe) == dense_total + LAYERS * (mlp + router)
    assert flops_per_token(moe, 16) == 6 * (dense_total + LAYERS * (mlp + router)) + 12 * LAYERS * HIDDEN * 16


def test_the_router_loss_is_in_the_training_loss_and_logged_but_not_in_the_eval_loss(tmp_path):
    from effitrain.objectives.causal_lm import CausalLM
    from effitrain.objectives.common import mean_token_loss

    _, folder = _dense_folder(tmp_path)
    moe, _ = upcycle_moe(_params(aux_loss_coef=0.5), folder)
    ids = torch.randint(0, VOCAB, (2, 16))
    loss, metrics = CausalLM()(moe, {"input_ids": ids, "labels": ids}, None)
    lm_loss = mean_token_loss(moe(ids).logits, ids)
    assert metrics["router_aux_loss"] > 0
    assert torch.allclose(loss, lm_loss + 0.5 * metrics["router_aux_loss"], atol=1e-5)


def test_the_router_z_loss_is_added_with_its_weight_and_survives_save_and_load(tmp_path):
    # AquilaMoE trains with a router z-loss (ST-MoE: mean over tokens of logsumexp(router logits)^2, each MoE layer's
    # term summed); Mixtral has none, so the weight rides in the saved config and causal_lm adds it
    from transformers import AutoModelForCausalLM

    from effitrain.objectives.causal_lm import CausalLM
    from effitrain.objectives.common import mean_token_loss

    _, folder = _dense_folder(tmp_path)
    moe, _ = upcycle_moe(_params(aux_loss_coef=0.001, z_loss_coef=0.01, router_std=1.0), folder)
    moe.save_pretrained(tmp_path / "moe")
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "moe")
    ids = torch.randint(0, VOCAB, (2, 16))
    loss, metrics = CausalLM()(moe, {"input_ids": ids, "labels": ids}, None)
    with torch.no_grad():
        out = moe(ids)
        assert len(out.router_logits) == LAYERS and out.router_logits[0].shape == (2 * 16, 4)   # [tokens, experts]
        by_hand = sum(float(torch.logsumexp(logits, dim=-1).pow(2).mean()) for logits in out.router_logits)
        lm_loss = mean_token_loss(out.logits, ids)
    assert metrics["router_z_loss"] == pytest.approx(by_hand, rel=1e-5)
    assert torch.allclose(loss, lm_loss + 0.001 * metrics["router_aux_loss"] + 0.01 * by_hand, atol=1e-5)
    plain, _ = upcycle_moe(_params(), folder)   # z_loss_coef 0: the model's own loss, no z term
    assert "router_z_loss" not in CausalLM()(plain, {"input_ids": ids, "labels": ids}, None)[1]


def test_the_moe_model_saves_and_loads_as_a_stock_transformers_model(tmp_path):
    from transformers import AutoModelForCausalLM

    _, folder = _dense_folder(tmp_path)
    moe, _ = upcycle_moe(_params(), folder)
    with torch.no_grad():   # experts that have diverged, as after training
        moe.model.layers[1].mlp.experts.down_proj[2].add_(torch.randn(HIDDEN, INTER))
    moe.save_pretrained(tmp_path / "moe")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "moe")
    ids = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, moe(ids).logits, atol=1e-5)


def test_what_cannot_be_upcycled_is_refused_with_the_key(tmp_path):
    _, folder = _dense_folder(tmp_path)
    with pytest.raises(ConfigError, match="transform.top_k"):
        upcycle_moe(_params(top_k=5), folder)
    from transformers import GPT2Config, GPT2LMHeadModel
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=VOCAB)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ConfigError, match="gpt2 model cannot be upcycled"):
        upcycle_moe(_params(), tmp_path / "gpt2")


@pytest.mark.slow
def test_a_pipeline_stopped_in_its_moe_stage_resumes_exactly(tmp_path, train_in_process):
    run = ["+recipe=moe_upcycle", "scheduler=constant", "stages.0.train.max_steps=2", "stages.1.train.max_steps=4"]

    def moe_lines(run_dir):
        path = run_dir / "stages" / "02-moe" / "metrics.jsonl"
        return {l["step"]: (l["loss"], l["router_aux_loss"]) for l in
                map(json.loads, path.read_text().splitlines()) if "loss" in l}

    full, split = tmp_path / "full", tmp_path / "split"
    summary = train_in_process(run, full)
    dense_row, moe_row = summary["stages"]
    assert moe_row["transform"]["info"]["top_k"] == 2
    with sigterm_after_step(2, when=lambda state: state.run_dir.name == "02-moe"):
        assert not train_in_process(run, split)["finished"]
    assert train_in_process([*run, "resume=auto"], split)["finished"]
    assert moe_lines(split) == moe_lines(full) and sorted(moe_lines(full)) == [1, 2, 3, 4]
    # the MoE stage's first eval is the dense stage's last: the upcycled model starts as the dense function
    first_moe_eval = next(json.loads(l) for l in (full / "stages" / "02-moe" / "metrics.jsonl").read_text()
                          .splitlines() if "eval_loss" in l)
    assert first_moe_eval["eval_loss"] == pytest.approx(dense_row["final_eval_loss"], abs=1e-5)
