"""TriAdaptLoRA (2501.08008): the triangular core's split and shapes, the normalized-Frobenius importance, the update
the adapted layer computes, the growth schedule to the budget, the plain-LoRA export, and Ctrl-C/resume."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from conftest import TINY, ctrl_c_after, effitrain_cli

from effitrain.methods.tri_adapt_lora import TriAdaptGrowth
from effitrain.peft.tri_adapt import (TriangularCore, build_tri_adapt_lora, cores, folded_copy, modules_to_grow,
                                      raw_factors, select_growth, split_shapes)

PARAMS = SimpleNamespace(init_rank=1, add_rank=4, max_rank=17, alpha=16.0, dropout=0.0,
                         target_modules=["q_proj", "v_proj", "down_proj"], modules_to_save=[])


def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def randomise(model, seed=1):
    """Trained-looking factors: every parameter of the adapter nonzero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer, core in cores(model):
            a, b = raw_factors(layer)
            for p in (a, b, core.c_lower, core.c_upper):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def authors_core(core: TriangularCore) -> torch.Tensor:
    """C assembled the authors' way: per block a row of L (its columns up to and including its own block) and a
    column of U (its rows up to and including its own block), zero-padded and summed, r x r."""
    r = core.rank
    rows, cols, start = [], [], 0
    for spec in split_shapes(core):
        size = spec["lower_row"][0]
        end = start + size
        row = torch.zeros(size, r)
        row[:, :end] = core.c_lower.detach()[start:end, :end]
        col = torch.zeros(r, size)
        col[:end, :] = core.c_upper.detach()[:end, start:end]
        rows.append(row)
        cols.append(col)
        start = end
    return torch.cat(rows, 0) + torch.cat(cols, 1)


def test_the_triangular_split_has_the_authors_block_shapes_and_parts():
    core = TriangularCore(max_rank=17, init_rank=1, add_rank=4)
    core.rank = 9  # the first block and two growths
    assert [(s["lower_row"], s["upper_col"]) for s in split_shapes(core)] == [
        ((1, 1), (1, 1)), ((4, 5), (5, 4)), ((4, 9), (9, 4))]
    # L is block-lower (a row block sees the columns of its own and earlier blocks), U block-upper; both hold the
    # diagonal blocks; an entry of a later row block and an earlier column block is in L only, and vice versa
    assert core.lower_mask[5, 2] == 1 and core.upper_mask[5, 2] == 0
    assert core.upper_mask[2, 5] == 1 and core.lower_mask[2, 5] == 0
    assert core.lower_mask[3, 4] == 1 and core.upper_mask[3, 4] == 1          # both in block 1
    assert core.lower_mask[0, 1] == 0 and core.upper_mask[1, 0] == 0          # block 0 vs block 1
    with torch.no_grad():
        core.c_lower.copy_(torch.randn(17, 17))
        core.c_upper.copy_(torch.randn(17, 17))
    c = core.core()
    assert torch.allclose(c[:9, :9], authors_core(core))
    assert not c[9:].any() and not c[:, 9:].any()    # slots beyond the active rank do not exist yet


def test_importance_is_the_change_of_the_normalized_frobenius_norm():
    core = TriangularCore(max_rank=17, init_rank=1, add_rank=4)
    with torch.no_grad():
        core.c_lower.copy_(torch.randn(17, 17))
        core.c_upper.copy_(torch.randn(17, 17))
    core.rank = 9
    expected = math.sqrt(float((authors_core(core) ** 2).sum())) / 3      # three blocks
    assert core.normalized_norm() == pytest.approx(expected, rel=1e-6)
    # the hook's score is the change since the previous allocation
    model = build_tri_adapt_lora(PARAMS, tiny_model())
    hook = TriAdaptGrowth(warmup=0, interval=1, growth="linear", budget=None, reference_rank=8, orth_reg_weight=0)
    state = SimpleNamespace(model=model, spec=SimpleNamespace(train=SimpleNamespace(max_steps=100, log_every=1)), metrics={})
    hook.on_fit_start(state)
    before = dict(hook.pre_norm)
    assert all(v == pytest.approx(1.0) for v in before.values())     # C = identity of rank 1, one block
    randomise(model)
    expected = {name: math.sqrt(float((authors_core(core) ** 2).sum())) / 1 - before[name]
                for name, _, core in cores(model)}
    hook.on_step_end(SimpleNamespace(**vars(state), step=1))
    event = hook.log[0]
    threshold = sorted(expected.values(), reverse=True)[event["k"] - 1]
    assert event["threshold"] == pytest.approx(threshold, rel=1e-6)
    # exactly the modules whose importance clears the threshold grew, by add_rank
    assert set(event["grown"]) == {n for n, v in expected.items() if v >= threshold}
    assert all(hook.ranks[n] == (5 if n in event["grown"] else 1) for n in expected)


def test_the_layer_computes_w_x_plus_alpha_over_r_b_c_a_x_and_growth_adds_nothing_but_the_rescale():
    model = build_tri_adapt_lora(PARAMS, tiny_model())
    randomise(model)
    name, layer, core = next(iter(cores(model)))
    with torch.no_grad():  # slots not yet active were never trained (zero gradient): still at their init
        layer.lora_B["default"].weight[:, 1:] = 0
        core.c_upper[:, 1:] = 0
        core.c_lower[1:] = torch.eye(17)[1:]
    x = torch.randn(3, layer.in_features)
    a, b = raw_factors(layer)
    r = core.rank
    c = authors_core(core)
    expected = x @ layer.base_layer.weight.T + (PARAMS.alpha / r) * (x @ (b[:, :r] @ c @ a[:r]).T)
    assert torch.allclose(layer(x), expected, atol=1e-5)
    delta_before = layer(x) - x @ layer.base_layer.weight.T
    core.rank = 5   # one growth: the new columns of B are zero, so only alpha / r changes
    delta_after = layer(x) - x @ layer.base_layer.weight.T
    assert torch.allclose(delta_after, delta_before * (1 / 5), atol=1e-6)
    # inactive slots receive no gradient: they are parameters that do not exist yet
    core.rank = 1
    layer(x).sum().backward()
    assert not a.grad[1:].any() and not b.grad[:, 1:].any()
    assert not core.c_lower.grad[1:].any() and not core.c_upper.grad[:, 1:].any()
    assert a.grad[:1].any() and core.c_lower.grad[0, 0] != 0


def test_the_growth_schedule_reaches_the_budget_on_the_authors_linear_threshold():
    modules, init, add, max_rank, budget, total_steps, interval = 28, 1, 4, 17, 224, 200, 10
    ranks = {f"m{i:02d}": init for i in range(modules)}
    grown_per_event = []
    for step in range(interval, total_steps + 1, interval):
        total = sum(ranks.values())
        if total >= budget:
            break
        # the authors: k = int(remaining ranks x progress), at least 1
        k = modules_to_grow(step, total_steps, 0, "linear", budget, total, modules)
        assert k == min(max(int((budget - total) * step / total_steps), 1), modules)
        scores = {n: float((i * 5 + step) % modules) for i, n in enumerate(ranks)}  # distinct, varying
        grown = select_growth(scores, k, ranks, max_rank, add, room=budget - total)
        threshold = sorted(scores.values(), reverse=True)[k - 1]
        assert all(scores[n] >= threshold for n in grown)      # only modules at or above the threshold grow
        assert len(grown) == min(k, (budget - total) // add)   # distinct scores: exactly the top k (budget allowing)
        for n in grown:
            ranks[n] += add
        grown_per_event.append(len(grown))
    assert grown_per_event == [9, 16, 14, 8, 2]            # 196 ranks to add, fast at first, as the threshold falls
    assert sum(ranks.values()) == budget
    assert max(ranks.values()) <= max_rank
    # the exponential schedule: exp(progress x ln(remaining))
    assert modules_to_grow(100, 200, 0, "exponential", 224, 28, 100) == int(math.exp(0.5 * math.log(196)))


def test_the_exported_adapter_is_a_plain_peft_lora_with_the_same_model(tmp_path):
    from peft import PeftModel

    from effitrain.peft.adapters import export_final_model

    model = build_tri_adapt_lora(PARAMS, tiny_model())
    randomise(model)
    for _, _, core in cores(model):
        core.rank = 5
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    info = export_final_model(model, None, tmp_path)
    assert info["merged"] is True
    from transformers import AutoModelForCausalLM
    merged = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-5)
        base = tiny_model()   # same seed: the same base weights
        plain = PeftModel.from_pretrained(base, tmp_path / "adapter")
        assert torch.allclose(plain(input_ids=ids).logits, expected, atol=1e-5)
    assert any(core.rank == 5 for _, _, core in cores(model))   # the live model is untouched


def test_check_refuses_the_growth_method_without_its_adapter():
    result = effitrain_cli("check", "+recipe=lora", "+methods.tri_adapt_lora.interval=5")
    assert result.returncode == 2
    assert "methods.tri_adapt_lora" in result.stderr and "peft=tri_adapt_lora" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_ctrl_c_then_resume_grows_the_same_ranks(tmp_path):
    from test_resume_ctrl_c import NOT_REPEATABLE, RUN, assert_repeats, logged, start

    # allocations every 3 steps: Ctrl-C lands after the first line (step 4), so growths at 6, 9, 12 happen after;
    # a budget of 200 ranks over 14 modules (capacity 14 x 17) is still being filled then (70, 126, 182, 198)
    args = [*RUN, "+recipe=tri_adapt_lora", "model=tiny_llama", "methods.tri_adapt_lora.interval=3",
            "methods.tri_adapt_lora.budget=200"]
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    reference = start([*args, f"run_dir={full}"])
    result = ctrl_c_after([*args, f"run_dir={stopped}"], stopped / "metrics.jsonl", lines=1)
    out, err = reference.communicate(timeout=600)
    assert reference.returncode == 0, err[-2000:]
    assert result.returncode == 75, result.stderr[-2000:]
    stop = json.loads((stopped / "summary.json").read_text())["steps"]
    assert stop < 12
    resumed = effitrain_cli("resume", str(stopped))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected = logged(full)
    ranks = sorted({v for (step, k), v in expected.items() if k == "tri_adapt/total_rank"})
    assert ranks == [70.0, 126.0, 198.0], ranks   # logged at steps 4, 8, 12 and 14: grew after the stop
    assert_repeats(expected, logged(stopped), stop, last=14)


@pytest.mark.parametrize("override, says", [
    ("peft.max_rank=16", "peft.max_rank: 16 is not init_rank + a whole number of growths"),
    ("methods.tri_adapt_lora.growth=cubic", "methods.tri_adapt_lora.growth: 'cubic' is not one of"),
])
def test_check_names_a_bad_setting_in_one_line(override, says):
    result = effitrain_cli("check", "+recipe=tri_adapt_lora", override)
    assert result.returncode == 2 and says in result.stderr and result.stderr.count("\n") == 1, result.stderr
