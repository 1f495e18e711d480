"""Multi-level training (2404.07999): coalesce a model to half width and depth, train it, de-coalesce and interpolate
back -- the operators by hand, on a model, and a V-cycle pipeline stopped in its middle stage."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from conftest import sigterm_after_step
from effitrain.config.compose import compose_config
from effitrain.config.spec import validate
from effitrain.engine.metrics import flops_per_token
from effitrain.models.vcycle import (coalesce, decoalesce_interpolate, map_state, merge_mean, merge_sum, split_copy,
                                     split_half)
from effitrain.registry import ConfigError

W = torch.arange(16.0).view(4, 4)  # rows 0..3 = outputs, columns = inputs; channel c pairs with c + 2


def test_the_pair_maps_by_hand():
    # outputs averaged in pairs (row 0 with row 2, row 1 with row 3), inputs summed in pairs (column 0 with 2, ...)
    coalesced = merge_sum(merge_mean(W, 0), 1)
    assert coalesced.tolist() == [[(0 + 8 + 2 + 10) / 2, (1 + 9 + 3 + 11) / 2],
                                  [(4 + 12 + 6 + 14) / 2, (5 + 13 + 7 + 15) / 2]]
    # de-coalescing: rows copied, columns copied and halved
    back = split_half(split_copy(coalesced, 0), 1)
    assert back.tolist() == [[5.0, 6.0, 5.0, 6.0], [9.0, 10.0, 9.0, 10.0]] * 2
    # ... which is W averaged over every merged pair of rows and of columns
    averaged = (W + W.roll(2, 0) + W.roll(2, 1) + W.roll(2, 0).roll(2, 1)) / 4
    assert torch.equal(back, averaged)
    # and coalescing what was de-coalesced gives it back exactly
    assert torch.equal(merge_sum(merge_mean(back, 0), 1), coalesced)


def _tiny(tmp_path, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, **overrides)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # norms away from 1, so that averaging them is visible
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    path = tmp_path / "large"
    model.save_pretrained(path)
    return model, path


def _llama_params(V, h, I, L, H, kv, hd):
    return V * h + L * (h * H * hd + 2 * h * kv * hd + H * hd * h + 3 * h * I + 2 * h) + h


def test_coalescing_halves_every_width_and_the_depth_with_the_declared_counts(tmp_path):
    large, path = _tiny(tmp_path)
    small, info = coalesce(SimpleNamespace(width=True, depth=True), path)
    c = small.config
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size,
            c.num_hidden_layers, c.head_dim) == (8, 2, 1, 12, 2, 4)
    assert info["from_params"] == _llama_params(50, 16, 24, 4, 4, 2, 4) == sum(p.numel() for p in large.parameters())
    assert info["to_params"] == _llama_params(50, 8, 12, 2, 2, 1, 4) == sum(p.numel() for p in small.parameters())
    assert flops_per_token(small, 64) == 6 * info["to_params"] + 12 * 2 * 8 * 64  # 6N + attention, as every run
    # a weight by hand: the small layer 0's q_proj is large layers 0 and 2 averaged, each coalesced in width
    big = large.state_dict()
    expected = sum(merge_sum(merge_mean(big[f"model.layers.{i}.self_attn.q_proj.weight"], 0), 1) for i in (0, 2)) / 2
    assert torch.allclose(small.state_dict()["model.layers.0.self_attn.q_proj.weight"], expected)
    embed = big["model.embed_tokens.weight"]
    assert torch.allclose(small.model.embed_tokens.weight, embed[:, :8] + embed[:, 8:])  # hidden columns summed
    assert small.lm_head.weight.data_ptr() == small.model.embed_tokens.weight.data_ptr()  # still tied


def test_decoalescing_then_coalescing_is_the_identity_and_interpolation_is_exact(tmp_path):
    large, path = _tiny(tmp_path)
    small, _ = coalesce(SimpleNamespace(width=True, depth=True), path)
    small_path = tmp_path / "small"
    small.save_pretrained(small_path)
    for alpha in (1.0, 0.3):
        merged, info = decoalesce_interpolate(SimpleNamespace(reference=str(path), alpha=alpha, width=True,
                                                              depth=True), small_path)
        decoalesced = map_state({k: v for k, v in small.state_dict().items() if k != "lm_head.weight"},
                                layers=2, width=True, depth=True, coalesce=False)
        reference = large.state_dict()
        for key, tensor in merged.state_dict().items():
            key = "model.embed_tokens.weight" if key == "lm_head.weight" else key
            assert torch.allclose(tensor, (1 - alpha) * reference[key] + alpha * decoalesced[key], atol=1e-6), key
        if alpha == 1.0:  # pure de-coalescing: coalescing it again gives the small model back, tensor by tensor
            again = map_state({k: v for k, v in merged.state_dict().items() if k != "lm_head.weight"}, layers=4,
                              width=True, depth=True, coalesce=True)
            assert all(torch.allclose(again[k], v, atol=1e-6) for k, v in small.state_dict().items()
                       if k != "lm_head.weight")
            assert merged.config.num_hidden_layers == 4 and merged.config.hidden_size == 16
            # layers j and j + 2 of the de-coalesced model are copies
            sd = merged.state_dict()
            assert torch.equal(sd["model.layers.0.mlp.up_proj.weight"], sd["model.layers.2.mlp.up_proj.weight"])


def test_shapes_that_cannot_be_halved_or_matched_are_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path / "odd")
    with pytest.raises(ConfigError, match=r"halving needs even sizes; the model has num_hidden_layers=3"):
        coalesce(SimpleNamespace(width=True, depth=True), tmp_path / "odd")
    _, path = _tiny(tmp_path)
    small, _ = coalesce(SimpleNamespace(width=True, depth=False), path)   # width only
    small.save_pretrained(tmp_path / "small")
    with pytest.raises(ConfigError, match=r"would not have the reference's shape \(num_hidden_layers 8 vs 4\)"):
        decoalesce_interpolate(SimpleNamespace(reference=str(path), alpha=0.5, width=True, depth=True),
                               tmp_path / "small")
    with pytest.raises(ConfigError, match=r"reference: .* holds no model"):
        decoalesce_interpolate(SimpleNamespace(reference=str(tmp_path / "none"), alpha=0.5, width=True, depth=False),
                               tmp_path / "small")


def test_a_reference_to_a_stage_that_does_not_come_earlier_is_refused_by_name():
    composed = compose_config(["+recipe=vcycle", "stages.2.transform.reference=@stage:lagre"])
    with pytest.raises(ConfigError, match=r"'@stage:lagre' must name an earlier stage \(did you mean 'large'\?\)"):
        validate(composed.cfg, composed.recipes)



def test_odd_sizes_of_a_config_built_model_are_refused_before_the_first_stage_trains():
    # the model of stage 'large' comes from config: its odd sizes are known without training it
    for overrides, odd in [(["model.num_layers=3"], "model.num_layers=3"),
                           (["model.num_kv_heads=1"], "model.num_kv_heads=1")]:
        composed = compose_config(["+recipe=vcycle", *overrides])
        with pytest.raises(ConfigError, match=rf"^stages.small.transform: coalesce halves the model and needs even "
                                              rf"sizes; the stage before has {odd}$"):
            validate(composed.cfg, composed.recipes)
    # coalescing only the width leaves the depth alone: three layers are fine then
    composed = compose_config(["+recipe=vcycle", "model.num_layers=3", "stages.1.transform.depth=false",
                               "+stages.2.transform.depth=false"])
    assert [s.name for s in validate(composed.cfg, composed.recipes).stages] == ["large", "small", "merged"]


@pytest.mark.slow
def test_a_vcycle_stopped_in_its_small_stage_resumes_exactly(tmp_path, train_in_process):
    run = ["+recipe=vcycle", "stages.0.train.max_steps=2", "stages.1.train.max_steps=4", "stages.2.train.max_steps=2"]

    def losses(run_dir):
        return {stage.name: [l["loss"] for l in map(json.loads, (stage / "metrics.jsonl").read_text().splitlines())
                             if "loss" in l] for stage in sorted((run_dir / "stages").iterdir())}

    full, split = tmp_path / "full", tmp_path / "split"
    summary = train_in_process(run, full)
    with sigterm_after_step(2, when=lambda state: state.run_dir.name == "02-small"):
        assert not train_in_process(run, split)["finished"]
    resumed = train_in_process([*run, "resume=auto"], split)
    assert losses(split) == losses(full) and [len(v) for v in losses(full).values()] == [2, 4, 2]
    rows = summary["stages"]
    assert rows[1]["transform"]["info"]["to_hidden_size"] == 32 and rows[1]["transform"]["info"]["to_layers"] == 1
    assert rows[2]["transform"]["info"]["alpha"] == 0.5
    # the pipeline's FLOPs are its stages' (the small stage's per token about 1/8 of the others' block part)
    assert resumed["totals"]["flops"] == summary["totals"]["flops"] == sum(r["flops"] for r in rows)
    assert rows[1]["flops"] / rows[1]["tokens"] < rows[0]["flops"] / rows[0]["tokens"] / 2
