"""Objectives: what the loop minimises, as a registered block.

What holds: ``causal_lm`` is exactly the model's own loss (what the loop computed before objectives existed);
``weighted_causal_lm`` is sum_i w_i l_i / sum_i w_i with the weights a method hook puts in the batch; ``distill`` is
alpha * T^2 KL(teacher || student) + (1 - alpha) * CE with a teacher that stays frozen; ``layerwise`` decodes
intermediate layers with the model's own final norm and head, so layer k's loss is the loss of the model cut after
layer k.  A real run writes the objective's metrics into metrics.jsonl; bad input is one line before any run dir.
"""

from __future__ import annotations

import copy
import json
import re

import yaml

import pytest
import torch
import torch.nn.functional as F
import transformers

from effitrain.config.compose import compose_config
from effitrain.config.spec import validate
from effitrain.engine.events import EventBus, Hook
from effitrain.errors import RunFailed
from effitrain.config.blocks import load_builtin_blocks
from effitrain.registry import REGISTRY, ConfigError

VOCAB, LAYERS = 48, 3


def tiny_llama(seed: int = 0, vocab: int = VOCAB) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                      tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config).eval()  # no dropout in Llama; eval() only says so


def batch(rows: int = 4, length: int = 12, seed: int = 1) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}  # what the loop feeds: packed rows, every position labelled


def objective(name: str, model=None, tokenizer=None, **params):
    load_builtin_blocks()
    block = REGISTRY.parse("objective", {"name": name, **params})
    return block.build(model=model, device="cpu", bf16_supported=False, tokenizer=tokenizer)


def word_tokenizer(words: list[str]) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer whose ids are the positions of ``words``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=words[0])


@pytest.fixture
def teacher_dir(tmp_path):
    """A different tiny Llama with the same vocabulary, saved as a Hugging Face folder."""
    path = tmp_path / "teacher"
    tiny_llama(seed=7).save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------- causal_lm
def test_causal_lm_is_exactly_the_models_own_loss():
    model, b = tiny_llama(), batch()
    loss, metrics = objective("causal_lm", model)(model, b, None)
    assert torch.equal(loss, model(**b).loss) and metrics == {}


def test_the_default_objective_is_causal_lm_and_a_stored_config_without_one_resumes_as_causal_lm():
    composed = compose_config([])
    assert composed.cfg["objective"] == {"name": "causal_lm"}
    stored = {k: v for k, v in composed.cfg.items() if k != "objective"}  # a run from before objectives existed
    assert validate(stored).block("objective").name == "causal_lm"


# ---------------------------------------------------------------------------------------------- weighted
def per_example_losses(model, b) -> torch.Tensor:
    """Each row's own loss, from its own forward pass."""
    return torch.stack([model(input_ids=b["input_ids"][i:i + 1], labels=b["labels"][i:i + 1]).loss
                        for i in range(b["input_ids"].shape[0])])


def test_weighted_with_no_weights_or_uniform_weights_equals_causal_lm():
    model, b = tiny_llama(), batch()
    reference = model(**b).loss
    weighted = objective("weighted_causal_lm", model)
    assert torch.allclose(weighted(model, b, None)[0], reference, atol=1e-6)
    uniform = {**b, "example_weights": torch.full((4,), 3.0)}
    assert torch.allclose(weighted(model, uniform, None)[0], reference, atol=1e-6)


def test_weighted_with_one_hot_weights_is_that_examples_loss_and_general_weights_the_weighted_mean():
    model, b = tiny_llama(), batch()
    own = per_example_losses(model, b)
    weighted = objective("weighted_causal_lm", model)
    one_hot = {**b, "example_weights": torch.tensor([0.0, 0.0, 1.0, 0.0])}
    assert torch.allclose(weighted(model, one_hot, None)[0], own[2], atol=1e-6)
    w = torch.tensor([1.0, 2.0, 0.0, 5.0])
    loss, metrics = weighted(model, {**b, "example_weights": w}, None)
    assert torch.allclose(loss, (w * own).sum() / 8.0, atol=1e-6)
    assert torch.allclose(metrics["unweighted_loss"], own.mean(), atol=1e-6)


def test_a_method_hook_supplies_the_weights_at_batch_start():
    class DownWeightFirstRow(Hook):  # what a loss-reweighting method does: weights per example, each micro-batch
        name = "down_weight_first_row"

        def on_batch_start(self, state):
            state.batch["example_weights"] = torch.tensor([0.0, 1.0, 1.0, 1.0])

    class State:
        batch = None

    model, state, bus = tiny_llama(), State(), EventBus([DownWeightFirstRow()])
    state.batch = batch()
    bus.emit("batch_start", state)
    loss, _ = objective("weighted_causal_lm", model)(model, state.batch, state)
    assert torch.allclose(loss, per_example_losses(model, state.batch)[1:].mean(), atol=1e-6)


def test_weights_of_the_wrong_shape_or_missing_when_required_are_one_line_errors():
    model, b = tiny_llama(), batch()
    with pytest.raises(RunFailed, match=re.escape("has shape (3,), expected (4,), one weight per example")):
        objective("weighted_causal_lm", model)(model, {**b, "example_weights": torch.ones(3)}, None)
    with pytest.raises(RunFailed, match="has no batch\\['example_weights'\\] and objective.default_weight is null"):
        objective("weighted_causal_lm", model, default_weight=None)(model, b, None)


# ---------------------------------------------------------------------------------------------- distill
def test_distill_from_a_teacher_equal_to_the_student_has_zero_soft_loss(tmp_path):
    student = tiny_llama()
    student.save_pretrained(tmp_path / "same")
    b = batch()
    for loss_kind in ("kl", "mse_logits"):
        distill = objective("distill", student, teacher=str(tmp_path / "same"), alpha=1.0, temperature=2.0,
                            loss=loss_kind)
        loss, metrics = distill(student, b, None)
        assert abs(metrics["soft_loss"].item()) < 1e-6, loss_kind
        assert torch.equal(metrics["hard_loss"], student(**b).loss)
        assert torch.equal(loss, metrics["soft_loss"])  # alpha = 1: the hard loss has no weight


def hand_written_kd(student, teacher, b, T: float) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), summed over the vocabulary, averaged over the positions t that
    predict token t+1 - written out from the definition."""
    s = student(input_ids=b["input_ids"]).logits[:, :-1]
    with torch.no_grad():
        t = teacher(input_ids=b["input_ids"]).logits[:, :-1]
    p_t = torch.softmax(t / T, dim=-1)
    kl = (p_t * (torch.log(p_t) - torch.log_softmax(s / T, dim=-1))).sum(-1)
    return T * T * kl.mean()


def test_distill_loss_and_gradient_match_a_hand_written_kl(teacher_dir):
    student, b, T, alpha = tiny_llama(), batch(), 3.0, 0.25
    teacher = transformers.AutoModelForCausalLM.from_pretrained(teacher_dir)
    distill = objective("distill", student, teacher=str(teacher_dir), alpha=alpha, temperature=T)

    loss, metrics = distill(student, b, None)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    expected = alpha * hand_written_kd(student, teacher, b, T) + (1 - alpha) * student(**b).loss
    expected.backward()
    assert torch.allclose(loss, expected, atol=1e-6)
    assert metrics["soft_loss"] > 0.01  # a different teacher: the test is not comparing zeros
    for name, p in student.named_parameters():
        assert torch.allclose(ours[name], p.grad, atol=1e-6, rtol=1e-4), name


def test_the_teacher_is_frozen_in_eval_mode_and_unchanged_by_optimizer_steps(teacher_dir):
    student = tiny_llama().train()
    distill = objective("distill", student, teacher=str(teacher_dir), alpha=0.5)
    teacher = distill.teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    before = {n: p.clone() for n, p in teacher.state_dict().items()}
    student_before = copy.deepcopy(student.state_dict())
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    for step in range(3):
        loss, _ = distill(student, batch(seed=step), None)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(before[n], p) for n, p in teacher.state_dict().items())
    assert not torch.equal(student_before["lm_head.weight"], student.state_dict()["lm_head.weight"])  # it trained


def test_the_teacher_runs_in_bfloat16_only_on_a_gpu_that_supports_it():
    from effitrain.objectives.distill import teacher_dtype

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert teacher_dtype("auto", gpu, bf16_supported=True) is torch.bfloat16
    assert teacher_dtype("auto", gpu, bf16_supported=False) is torch.float32
    assert teacher_dtype("auto", cpu, bf16_supported=True) is torch.float32
    assert teacher_dtype("bfloat16", cpu, bf16_supported=False) is torch.bfloat16  # asked for explicitly


def test_a_teacher_whose_saved_tokenizer_maps_tokens_to_other_ids_is_refused(tmp_path):
    words = [f"w{i}" for i in range(VOCAB)]
    teacher = tmp_path / "teacher"
    tiny_llama(seed=7).save_pretrained(teacher)
    word_tokenizer(words).save_pretrained(teacher)
    student = tiny_llama()
    objective("distill", student, tokenizer=word_tokenizer(words), teacher=str(teacher))  # the same ids: accepted
    swapped = [words[1], words[0], *words[2:]]  # same size, two tokens trade ids
    with pytest.raises(ConfigError, match=re.escape(f"differs from the run's (2 of {VOCAB} tokens have another id")):
        objective("distill", student, tokenizer=word_tokenizer(swapped), teacher=str(teacher))


def test_a_teacher_with_another_vocabulary_or_no_folder_is_refused(tmp_path):
    tiny_llama(vocab=VOCAB + 16).save_pretrained(tmp_path / "wide")
    with pytest.raises(ConfigError, match=f"has a vocabulary of {VOCAB + 16} tokens, the student {VOCAB}"):
        objective("distill", tiny_llama(), teacher=str(tmp_path / "wide"))
    with pytest.raises(ConfigError, match=re.escape("objective.teacher: '") + ".*nowhere' does not exist"):
        objective("distill", tiny_llama(), teacher=str(tmp_path / "nowhere"))


# ---------------------------------------------------------------------------------------------- layerwise
def cut_after(model, k: int):
    """The sub-model of SoFT: the same embeddings, the first k decoder layers, the shared final norm and head."""
    sub = copy.deepcopy(model)
    sub.model.layers = sub.model.layers[:k]
    sub.config.num_hidden_layers = k
    return sub


def test_layerwise_on_the_last_layer_alone_is_causal_lm():
    model, b = tiny_llama(), batch()
    loss, metrics = objective("layerwise", model, layers=[LAYERS])(model, b, None)
    assert torch.equal(loss, model(**b).loss)
    assert list(metrics) == [f"layer_loss/{LAYERS}"]


def test_an_intermediate_layer_is_decoded_by_the_shared_norm_and_head():
    model, b = tiny_llama(), batch()
    hidden = model(input_ids=b["input_ids"], output_hidden_states=True).hidden_states[1]
    logits = model.lm_head(model.model.norm(hidden))[:, :-1]
    by_hand = F.cross_entropy(logits.reshape(-1, VOCAB), b["labels"][:, 1:].reshape(-1))
    loss, metrics = objective("layerwise", model, layers=[1])(model, b, None)
    assert torch.allclose(loss, by_hand, atol=1e-6)
    assert torch.allclose(loss, cut_after(model, 1)(**b).loss, atol=1e-5)  # = the 1-layer sub-model's own loss


def test_layerwise_weights_mix_the_layer_losses():
    model, b = tiny_llama(), batch()
    loss, metrics = objective("layerwise", model, layers=[1, 2, 3], weights=[1.0, 0.0, 3.0])(model, b, None)
    l1, l3 = cut_after(model, 1)(**b).loss, model(**b).loss
    assert torch.allclose(loss, (l1 + 3 * l3) / 4, atol=1e-5)
    assert torch.allclose(metrics["layer_loss/2"], cut_after(model, 2)(**b).loss, atol=1e-5)


def test_layerwise_refuses_a_layer_out_of_range_and_bad_weights():
    with pytest.raises(ConfigError, match=re.escape("objective.layers[1]: layer 4 is out of range; the model has "
                                                    "3 decoder layers (1..3)")):
        objective("layerwise", tiny_llama(), layers=[2, 4])
    with pytest.raises(ConfigError, match=re.escape("objective.weights: 1 weights for 2 layers")):
        validate(compose_config(["objective=layerwise", "objective.layers=[1,2]", "objective.weights=[1]"]).cfg)
    with pytest.raises(ConfigError, match="layers count from 1"):
        validate(compose_config(["objective=layerwise", "objective.layers=[0,2]"]).cfg)


def test_layerwise_names_the_model_type_when_it_finds_no_final_norm():
    model = tiny_llama()
    model.model.norm = None  # a model whose final norm lives under a name the objective does not know
    with pytest.raises(ConfigError, match="cannot find the final norm of a 'llama' model"):
        objective("layerwise", model, layers=[1])


# ---------------------------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("overrides, message", [
    (["objective=distil"], "unknown objective option 'distil' (did you mean 'distill'?)"),
    (["objective=distill"], "objective.teacher: required, but not set"),
    (["objective=distill", "objective.teacher=/t", "objective.alpha=1.5"], "objective.alpha: 1.5 is out of range"),
    (["objective=distill", "objective.teacher=/t", "objective.loss=kld"], "objective.loss: 'kld' is not one of"),
    (["objective=weighted_causal_lm", "+objective.weights=1"], "objective.weights: unknown key"),
])
def test_bad_objective_config_is_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(compose_config(overrides).cfg)


# ---------------------------------------------------------------------------------------------- real runs
@pytest.mark.slow
def test_a_distill_stage_logs_soft_and_hard_loss_and_a_bad_teacher_leaves_no_run_dir(tmp_path, train_in_process):
    # the kd pattern: stage 1 trains the teacher, stage 2 a fresh student distilled from its final model
    pipeline = tmp_path / "pipeline"
    summary = train_in_process([
        "+stages=[{name: teacher, train: {max_steps: 2}}, {name: student, init: scratch, train: {grad_accum: 2}, "
        "objective: {name: distill, teacher: '@stage:teacher', alpha: 0.7}}]"], pipeline)
    assert summary["finished"]
    run = pipeline / "stages" / "02-student"
    teacher = yaml.safe_load((run / "config.yaml").read_text())["objective"]["teacher"]
    assert teacher == str(pipeline / "stages" / "01-teacher" / "final_model")
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    train_lines = [l for l in lines if "loss" in l]
    assert [l["step"] for l in train_lines] == [1, 2, 3, 4]
    for line in train_lines:  # loss is the window mean of alpha * soft + (1 - alpha) * hard, as are the metrics
        assert line["soft_loss"] > 0 and line["hard_loss"] > 0
        assert line["loss"] == pytest.approx(0.7 * line["soft_loss"] + 0.3 * line["hard_loss"], rel=1e-5)
    assert all("soft_loss" not in l for l in lines if "eval_loss" in l)  # eval: the plain next-token loss

    wide = tmp_path / "wide"
    tiny_llama(vocab=VOCAB).save_pretrained(wide)  # a vocabulary unlike the run's tokenizer
    refused = tmp_path / "refused"
    with pytest.raises(ConfigError, match="objective.teacher: the teacher at .* has a vocabulary of 48 tokens"):
        train_in_process(["objective=distill", f"objective.teacher={wide}"], refused)
    assert not refused.exists()


def test_resume_of_a_run_stored_before_objectives_existed_is_not_a_config_change(tmp_path):
    from effitrain.config.resume import check_resume_config

    cfg = compose_config([f"run_dir={tmp_path}"]).cfg
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({k: v for k, v in cfg.items() if k != "objective"}))
    check_resume_config(tmp_path, cfg, "auto")  # stored without objective = causal_lm: the same run
    with pytest.raises(ConfigError, match="objective.name: 'causal_lm' -> 'layerwise'"):
        check_resume_config(tmp_path, {**cfg, "objective": {"name": "layerwise", "layers": [1]}}, "auto")
