"""LoRAM (2502.13533): the pruned shapes and the importance that picks what is kept, the recovered adapter's nonzero
entries, and two exact identities between the pruned model with its adapter and the full model with the recovered
one."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from conftest import TINY, effitrain_cli

from effitrain.models.loram import (RECORD, kept_rows, loram_prune, plan_pruning, prune_model, recover_lora_state,
                                    recovered_model)

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_full(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def lora_on(model, seed=3):
    """A LoRA on every projection with every factor nonzero (as after training)."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=ALL, lora_dropout=0.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return peft_model.eval()


def test_pruning_keeps_the_same_share_of_head_groups_and_channels_in_every_layer_by_their_l2_magnitude():
    full = tiny_full()
    with torch.no_grad():  # make group 1 of layer 0 and channels 40.. of layer 1 the heaviest
        full.model.layers[0].self_attn.k_proj.weight[8:16] *= 10
        full.model.layers[1].mlp.up_proj.weight[40:] *= 10
    plan = plan_pruning(full, ratio=0.5, criterion="l2")
    assert plan["kept_kv_heads"][0] == [1]
    assert set(range(40, 48)) <= set(plan["kept_channels"][1])
    pruned = prune_model(full, plan)
    attn, mlp = pruned.model.layers[0].self_attn, pruned.model.layers[0].mlp
    # 2 kv groups -> 1 (with its 2 query heads), 48 FFN channels -> 24; hidden 32 and head_dim 8 kept
    assert (pruned.config.num_key_value_heads, pruned.config.num_attention_heads) == (1, 2)
    assert pruned.config.intermediate_size == 24 and pruned.config.head_dim == 8
    assert tuple(attn.q_proj.weight.shape) == (16, 32) and tuple(attn.k_proj.weight.shape) == (8, 32)
    assert tuple(attn.o_proj.weight.shape) == (32, 16)
    assert tuple(mlp.gate_proj.weight.shape) == (24, 32) and tuple(mlp.down_proj.weight.shape) == (32, 24)
    # every kept weight is the full model's: query heads 2 and 3 (group 1), their o_proj columns
    assert torch.equal(attn.q_proj.weight, full.model.layers[0].self_attn.q_proj.weight[16:32])
    assert torch.equal(attn.o_proj.weight, full.model.layers[0].self_attn.o_proj.weight[:, 16:32])
    keep = plan["kept_channels"][0]
    assert torch.equal(mlp.down_proj.weight, full.model.layers[0].mlp.down_proj.weight[:, keep])
    assert getattr(pruned.config, RECORD) == plan   # the record travels in config.json
    random = plan_pruning(full, ratio=0.5, criterion="random", seed=1)
    assert random["kept_kv_heads"] != plan["kept_kv_heads"] or random["kept_channels"] != plan["kept_channels"]


def test_the_transform_saves_a_pruned_model_that_loads_with_its_record(tmp_path):
    from transformers import AutoModelForCausalLM

    tiny_full().save_pretrained(tmp_path / "full")
    pruned, info = loram_prune(SimpleNamespace(ratio=0.5, criterion="l2", seed=0), tmp_path / "full")
    assert info["kv_heads"] == "2 -> 1" and info["ffn"] == "48 -> 24" and info["params_pruned"] < info["params_full"]
    pruned.save_pretrained(tmp_path / "pruned")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    assert getattr(again.config, RECORD)["kept_kv_heads"] == getattr(pruned.config, RECORD)["kept_kv_heads"]
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        assert torch.allclose(again(input_ids=ids).logits, pruned.eval()(input_ids=ids).logits)


def _pruned_with_adapter(tmp_path):
    from peft import get_peft_model_state_dict

    full = tiny_full()
    plan = plan_pruning(full, ratio=0.5, criterion="l2")
    pruned = lora_on(prune_model(full, plan))
    pruned.save_pretrained(tmp_path / "adapter")
    return full, plan, pruned, get_peft_model_state_dict(pruned)


def test_the_recovered_adapter_is_nonzero_exactly_at_the_kept_positions(tmp_path):
    full, plan, pruned, state = _pruned_with_adapter(tmp_path)
    recovered = recovered_model(tiny_full(), tmp_path / "adapter", plan)
    from peft import get_peft_model_state_dict

    out = get_peft_model_state_dict(recovered)
    assert set(out) == set(state)
    checked = 0
    for key, small in state.items():
        big = out[key]
        layer = int(key.split("layers.")[1].split(".")[0])
        module = next(m for m in ALL if f".{m}." in key)
        what = "ffn" if module in ("gate_proj", "up_proj", "down_proj") else ("kv" if module in ("k_proj", "v_proj")
                                                                              else "q")
        dim = 1 if module in ("o_proj", "down_proj") and "lora_A" in key else \
            0 if module not in ("o_proj", "down_proj") and "lora_B" in key else None
        if dim is None:   # the factor on the hidden side: unchanged
            assert torch.equal(big, small)
            continue
        kept = kept_rows(plan, layer, what)
        nonzero = (big.abs().sum(1 - dim) != 0).nonzero().flatten()
        assert nonzero.tolist() == kept.tolist(), key     # nonzero rows/columns = exactly the kept ones
        assert torch.equal(big.index_select(dim, kept), small)
        assert big.shape[dim] > small.shape[dim]
        checked += 1
    assert checked == 2 * 7   # two layers, one pruned factor of each of the seven projections


def test_the_full_model_with_the_recovered_adapter_equals_the_pruned_one_on_the_kept_subnetwork(tmp_path):
    """Identity 1: zero the pruned heads' o_proj columns and the pruned channels' down_proj columns of the full model
    (what removes them from the output); with the recovered adapter it computes exactly the pruned model with its
    adapter.  Identity 2: merged, the full weights change only at the kept positions, by the pruned adapter's
    update."""
    full, plan, pruned, _ = _pruned_with_adapter(tmp_path)
    masked = tiny_full()
    with torch.no_grad():
        for i, layer in enumerate(masked.model.layers):
            q_cut = torch.ones(32, dtype=torch.bool)
            q_cut[kept_rows(plan, i, "q")] = False
            layer.self_attn.o_proj.weight[:, q_cut] = 0
            f_cut = torch.ones(48, dtype=torch.bool)
            f_cut[kept_rows(plan, i, "ffn")] = False
            layer.mlp.down_proj.weight[:, f_cut] = 0
    recovered = recovered_model(masked, tmp_path / "adapter", plan).eval()
    ids = torch.tensor([[5, 9, 2, 6, 5, 3, 5, 8]])
    with torch.no_grad():
        assert torch.allclose(recovered(input_ids=ids).logits, pruned(input_ids=ids).logits, atol=1e-5)
        # and without the masking the full model is not that (the pruned structures do contribute)
        unmasked = recovered_model(tiny_full(), tmp_path / "adapter", plan).eval()
        assert not torch.allclose(unmasked(input_ids=ids).logits, pruned(input_ids=ids).logits, atol=1e-3)

    merged = unmasked.merge_and_unload()
    base = tiny_full()
    pruned_merged = pruned.merge_and_unload()
    for i in range(2):
        for module, rows, cols in (("self_attn.q_proj", "q", None), ("self_attn.o_proj", None, "q"),
                                   ("mlp.up_proj", "ffn", None), ("mlp.down_proj", None, "ffn")):
            get = lambda m: dict(m.named_parameters())[f"model.layers.{i}.{module}.weight"]  # noqa: E731
            delta = get(merged) - get(base)
            small = get(pruned_merged) - prune_model(tiny_full(), plan).state_dict()[f"model.layers.{i}.{module}.weight"]
            index = kept_rows(plan, i, rows or cols)
            dim = 0 if rows else 1
            assert torch.allclose(delta.index_select(dim, index), small, atol=1e-6)
            rest = torch.ones(delta.shape[dim], dtype=torch.bool)
            rest[index] = False
            assert not (delta.index_select(dim, rest.nonzero().flatten())).any()


def test_check_refuses_a_recovery_without_an_adapter_before_it():
    bad = ("+stages=[{name: base, train: {max_steps: 2}}, {name: r, init: previous, "
           "transform: {name: loram_recover, full: '@stage:base'}, train: {max_steps: 1}}]")
    result = effitrain_cli("check", bad)
    assert result.returncode == 2, result.stderr
    assert "loram_recover" in result.stderr and "peft=lora" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_the_recipe_runs_its_three_stages_and_ends_with_the_full_model(tmp_path):
    run = tmp_path / "run"
    result = effitrain_cli(*TINY, "+recipe=loram", f"run_dir={run}")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["finished"] and [s["stage"] for s in summary["stages"]] == ["base", "pruned_lora", "recovered"]
    assert summary["stages"][1]["transform"]["info"]["criterion"] == "taylor"   # LoRAM-Stru's, on demo-corpus rows
    pruned_cfg = json.loads((run / "handoff" / "02-pruned_lora" / "config.json").read_text())
    final_cfg = json.loads((run / "stages" / "03-recovered" / "final_model" / "config.json").read_text())
    base_cfg = json.loads((run / "stages" / "01-base" / "final_model" / "config.json").read_text())
    assert pruned_cfg["intermediate_size"] * 2 == base_cfg["intermediate_size"] == final_cfg["intermediate_size"]
    assert RECORD in pruned_cfg and RECORD not in final_cfg
    # the recovered model only evaluates: its two evaluations (start, end) agree, lr 0 changed nothing
    evals = [json.loads(l)["eval_loss"] for l in (run / "stages" / "03-recovered" / "metrics.jsonl").read_text()
             .splitlines() if "eval_loss" in json.loads(l)]
    assert len(evals) >= 2 and evals[0] == pytest.approx(evals[-1], abs=1e-6)


@pytest.mark.parametrize("override, says", [
    ("stages.2.transform.full=/nonexistent", "stages.recovered.transform.full: '/nonexistent' is not a save_pretrained"),
    ("stages.1.transform.ratio=1.0", "stages.pruned_lora.transform.ratio: 1.0 is out of range"),
])
def test_check_names_a_bad_setting_in_one_line(override, says):
    result = effitrain_cli("check", "+recipe=loram", override)
    assert result.returncode == 2 and says in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_taylor_importance_is_the_summed_first_order_term_of_each_coupled_group():
    from effitrain.models.loram import group_importance, taylor_gradients

    model = tiny_full()
    g = torch.Generator().manual_seed(0)
    taylor_gradients(model, [torch.randint(0, 64, (1, 12), generator=g) for _ in range(2)])
    scores = group_importance(model, "taylor", seed=0)
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    t = lambda w: (w.detach() * w.grad).abs()  # noqa: E731
    # kv group 1 of layer 1: query heads 2, 3 (rows 16..31, o columns 16..31), key/value head 1 (rows 8..15)
    expected = (t(attn.q_proj.weight)[16:32].sum() + t(attn.o_proj.weight)[:, 16:32].sum()
                + t(attn.k_proj.weight)[8:16].sum() + t(attn.v_proj.weight)[8:16].sum())
    assert scores[1]["kv"][1] == pytest.approx(float(expected), rel=1e-5)
    channel = t(mlp.gate_proj.weight)[7].sum() + t(mlp.up_proj.weight)[7].sum() + t(mlp.down_proj.weight)[:, 7].sum()
    assert scores[1]["ffn"][7] == pytest.approx(float(channel), rel=1e-5)
    # the gradient matters: a weight-magnitude ranking of the same model is a different quantity
    assert not torch.allclose(scores[1]["ffn"], group_importance(model, "l2", seed=0)[1]["ffn"])
