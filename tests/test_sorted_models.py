"""Many-in-one depth sub-models: Sorted LLaMA / SoFT (objective=layerwise, sample=all) and SortedNet (sample=one),
with per-depth evaluation and export (methods.export_depths).

The mechanism: a depth's sub-model is the first K layers under the shared final norm and head, both when trained
alone (the cut forward of sample=one) and when exported as its own model; SortedNet draws depths with the declared
odds, the same after a resume, and only the drawn sub-model gets gradients and is charged FLOPs.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from conftest import sigterm_after_step
from effitrain.methods.export_depths import truncate_to_depth
from effitrain.objectives.common import mean_token_loss
from effitrain.objectives.layerwise import Layerwise, final_norm, output_head, truncated_depth

VOCAB = 300


def _tiny(layers=4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        tie_word_embeddings=True))


def _objective(model, layers=(1, 2, 3, 4), weights=None, sample="one", seed=0):
    weights = list(weights or [1.0] * len(layers))
    return Layerwise(list(layers), weights, model.config.num_hidden_layers, final_norm(model), output_head(model),
                     sample=sample, seed=seed)


def test_an_exported_depth_is_the_sub_model_the_objective_decodes(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _tiny()
    objective = _objective(model, sample="all")
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        for depth in (1, 2, 4):
            truncate_to_depth(model, depth).save_pretrained(tmp_path / f"d{depth}")
            loaded = AutoModelForCausalLM.from_pretrained(tmp_path / f"d{depth}")
            assert loaded.config.num_hidden_layers == depth and len(loaded.model.layers) == depth
            assert torch.allclose(loaded(ids).logits, objective.layer_logits(out, depth), atol=1e-5)
    assert len(model.model.layers) == 4     # the trained model is untouched


def test_the_cut_forward_trains_the_sub_model_alone():
    model = _tiny()
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        expected = mean_token_loss(_objective(model, sample="all").layer_logits(
            model(ids, output_hidden_states=True), 2), ids)
    with truncated_depth(model, 2):
        loss = model(input_ids=ids, labels=ids).loss
    assert len(model.model.layers) == 4
    assert torch.allclose(loss, expected, atol=1e-5)
    loss.backward()
    assert all(p.grad is None for p in model.model.layers[2].parameters())    # above the cut: neither run nor trained
    assert all(p.grad is not None for p in model.model.layers[1].parameters())


def test_sortednet_draws_depths_with_the_declared_odds_the_same_after_a_resume():
    model = _tiny()
    uniform = _objective(model)
    draws = [uniform.depth_of(s) for s in range(4000)]
    for depth in (1, 2, 3, 4):   # each 1/4: 1000 expected, sd ~27
        assert abs(draws.count(depth) - 1000) < 4 * 28
    assert [_objective(model).depth_of(s) for s in range(50)] == draws[:50]      # a function of (seed, step)
    assert [_objective(model, seed=1).depth_of(s) for s in range(50)] != draws[:50]
    only_three = _objective(model, weights=[0, 0, 1, 0])
    assert {only_three.depth_of(s) for s in range(100)} == {3}


def _grads(model):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def test_sortednet_draws_a_depth_per_micro_batch_and_a_step_sums_their_sub_models_gradients():
    # the authors' loop samples a sub-model for every batch it backpropagates: with 4 accumulated micro-batches an
    # optimizer step sums the gradients of the sub-models its micro-batches drew (one depth per step did not)
    model = _tiny()
    objective = _objective(model)
    batches = [torch.randint(0, VOCAB, (2, 12)) for _ in range(4)]
    for step in range(5):
        model.zero_grad()
        drawn = []
        for m, ids in enumerate(batches):
            loss, metrics = objective(model, {"input_ids": ids, "labels": ids},
                                      SimpleNamespace(step=step, micro_step=4 * step + m))
            (loss / 4).backward()
            drawn.append(int(metrics["sampled_depth"]))
        if len(set(drawn)) > 1:
            break
    assert len(set(drawn)) > 1, f"every micro-batch of 5 steps drew one depth: {drawn}"
    assert drawn == [objective.depth_of(4 * step + m) for m in range(4)]   # every rank draws the same depths
    accumulated = _grads(model)
    top_trained = model.model.layers[3].self_attn.q_proj.weight.grad is not None
    expected = [torch.zeros_like(p) for p in model.parameters()]
    for depth, ids in zip(drawn, batches):   # each micro-batch's sub-model alone, by hand
        model.zero_grad()
        with truncated_depth(model, depth):
            (model(input_ids=ids, labels=ids).loss / 4).backward()
        expected = [e + g for e, g in zip(expected, _grads(model))]
    assert all(torch.allclose(a, e, atol=1e-6) for a, e in zip(accumulated, expected))
    # the top layer got gradients only from the micro-batches that drew the full depth
    assert top_trained == (4 in drawn)
    # draw_every=step: one depth for every micro-batch of a step
    per_step = Layerwise([1, 2, 3, 4], [1.0] * 4, 4, final_norm(model), output_head(model), sample="one",
                         draw_every="step")
    ids = batches[0]
    batch = {"input_ids": ids, "labels": ids}
    depths = {int(per_step(model, batch, SimpleNamespace(step=step, micro_step=4 * step + m))[1]["sampled_depth"])
              for m in range(4)}
    assert depths == {per_step.depth_of(step)}


def test_sortednet_accumulates_each_micro_batchs_sub_model_gradient_over_a_step():
    """Three micro-batches of one optimizer step, each backward adding into .grad as the engine's accumulation
    does: the accumulated gradient is the sum of each micro-batch's own sub-model gradient (the depth it reports),
    computed alone by hand, and the layers above every trained depth accumulate nothing."""
    model = _tiny()
    objective = _objective(model)
    # a step whose three micro-batches draw different sub-models, none of them the whole model (layers left out)
    step = next(s for s in range(200) if len({objective.depth_of(3 * s + m) for m in range(3)}) > 1
                and max(objective.depth_of(3 * s + m) for m in range(3)) < 4)
    batches = [torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    depths = []
    for micro, ids in enumerate(batches):
        loss, metrics = objective(model, {"input_ids": ids, "labels": ids},
                                  SimpleNamespace(step=step, micro_step=3 * step + micro))
        (loss / len(batches)).backward()
        depths.append(int(metrics["sampled_depth"]))
    accumulated = {name: p.grad for name, p in model.named_parameters()}

    expected: dict = {}
    last_alone: dict = {}
    for ids, depth in zip(batches, depths):
        model.zero_grad(set_to_none=True)
        with truncated_depth(model, depth):
            (model(input_ids=ids, labels=ids).loss / len(batches)).backward()
        for name, p in model.named_parameters():
            if p.grad is not None:
                expected[name] = expected.get(name, 0) + p.grad
                last_alone[name] = p.grad
    assert set(name for name, g in accumulated.items() if g is not None) == set(expected)
    for name, grad in expected.items():
        torch.testing.assert_close(accumulated[name], grad, rtol=1e-5, atol=1e-7)
    above = {f"model.layers.{i}." for i in range(max(depths), 4)}
    assert above and not any(name.startswith(tuple(above)) for name in expected)
    head = "model.embed_tokens.weight"                  # every micro-batch added to it: not just the last one's
    assert not torch.allclose(accumulated[head], last_alone[head])


def test_sortednet_is_charged_only_for_the_layers_it_ran():
    model = _tiny()
    objective = _objective(model)
    per_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    state = SimpleNamespace(model=model, step=10, micro_step=10, tokens=10 * 512)    # one micro-batch per step
    skipped_layers = sum(4 - objective.depth_of(s) for s in range(10))
    assert objective.extra_flops(state) == -6.0 * per_layer * skipped_layers * 512
    # with 2 accumulated micro-batches per step there are 20 draws, each charged for its half of the tokens
    two = SimpleNamespace(model=model, step=10, micro_step=20, tokens=10 * 512)
    assert objective.extra_flops(two) == -6.0 * per_layer * sum(4 - objective.depth_of(d) for d in range(20)) * 256
    # sample=all: the shared head and norm run again for each depth below the last (depths 1-3 of 4 here)
    head_and_norm = VOCAB * 32 + 32
    assert _objective(model, sample="all").extra_flops(state) == 6.0 * head_and_norm * 3 * 10 * 512


def test_eval_reports_every_depths_loss():
    model = _tiny()
    objective = _objective(model, layers=(2, 4), sample="all")
    ids = torch.randint(0, VOCAB, (2, 12))
    losses = objective.eval_losses(model, {"input_ids": ids, "labels": ids})
    assert set(losses) == {"eval_loss_depth/2", "eval_loss_depth/4"}
    with torch.no_grad():
        assert torch.allclose(losses["eval_loss_depth/4"], model(input_ids=ids, labels=ids).loss, atol=1e-5)


@pytest.mark.slow
def test_sortednet_stopped_and_resumed_repeats_its_depths_and_exports_each(tmp_path, train_in_process):
    from transformers import AutoModelForCausalLM

    from effitrain.methods.export_depths import ExportDepths

    run = ["+recipe=sortednet", "scheduler=constant", "train.max_steps=6", "objective.layers=[1,2]",
           "methods.export_depths.layers=[1,2]"]

    def lines(run_dir):
        return {l["step"]: (l["loss"], l["sampled_depth"]) for l in
                map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in l}

    full, split = tmp_path / "full", tmp_path / "split"
    summary = train_in_process(run, full)
    with sigterm_after_step(2), pytest.MonkeyPatch.context() as m:
        m.setattr(ExportDepths, "on_fit_end", lambda self, state: None)
        assert not train_in_process(run, split)["finished"]
    resumed = train_in_process([*run, "resume=auto"], split)
    assert lines(split) == lines(full) and sorted(lines(full)) == list(range(1, 7))
    assert resumed["flops"] == summary["flops"] and summary["flops_methods"] < 0
    assert set(summary["eval_losses_depth"]) == {"1", "2"}
    for depth in (1, 2):
        folder = full / "final_model_depths" / f"depth_{depth}"
        assert AutoModelForCausalLM.from_pretrained(folder).config.num_hidden_layers == depth
        assert (folder / "tokenizer_config.json").is_file()
