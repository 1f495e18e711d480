"""objective: mixed -- weights over a stage equal the schedule (timeline, every k), components with weight 0 are not
computed, own data streams resume where they stopped, check-time refusals (one line), `effitrain plan` shows the
weights; controller relift buffers exactly the all-wrong questions and trains on them when full; controller sasr
draws SFT with the probability its rule gives for hand-set gradient norms; a SIGKILL mid-stage and resume repeats
the uninterrupted losses."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from effitrain.config.compose import compose_config
from effitrain.config.spec import validate
from effitrain.objectives.common import COMPLETION_REWARDS, IGNORE_INDEX
from effitrain.objectives.mix_controllers import ReLIFT, SASR, demonstration_row
from effitrain.objectives.mixed import Component, Mixed, OwnStream
from effitrain.registry import ConfigError

MIXED = ["dataset=chat_demo", "dataset.format=prompts", "objective=mixed",
         "+objective.components.rl={objective:{name:grpo},data:stage}",
         "+objective.components.sft={objective:sft,data:{format:chat}}"]


def _spec(*overrides: str):
    return validate(compose_config([*MIXED, *overrides]).cfg)


class Recorder:
    """A component objective that returns its weight-free loss 1.0 and records the batches it was given."""

    def __init__(self, value: float) -> None:
        self.value, self.calls = value, []

    def __call__(self, model, batch, state):
        self.calls.append((state.step, batch))
        return torch.tensor(self.value), {}


def _mixed(spec, objectives: dict, controller=None, streams=None) -> Mixed:
    params = spec.block("objective").params
    return Mixed([Component(c, objectives[c.name], (streams or {}).get(c.name)) for c in params.parsed], controller,
                 grad_accum=1)


def _resolved(spec):
    return spec.timeline.resolve(max_steps=spec.train.max_steps, tokens_per_step=1)


# ---------------------------------------------------------------------------------------------- the schedule
def test_weights_follow_the_timeline_linearly_and_the_loss_is_their_sum():
    spec = _spec("train.max_steps=10", "+timeline.objective_weights={unit:step,interpolate:linear,"
                 "points:[{at:0,value:{rl:0.0,sft:1.0}},{at:8,value:{rl:1.0,sft:0.0}}]}")
    rl, sft = Recorder(2.0), Recorder(3.0)
    mixed = _mixed(spec, {"rl": rl, "sft": sft})
    timeline = _resolved(spec)
    batch = {"input_ids": torch.zeros(1, 4, dtype=torch.long)}
    for step in range(10):
        w_rl = min(step / 8, 1.0)
        state = SimpleNamespace(step=step, micro_step=step, timeline=timeline)
        mixed.components[1].stream = SimpleNamespace(next_batch=lambda device: {"own": True})
        loss, metrics = mixed(None, batch, state)
        assert metrics["mix_weight/rl"].item() == pytest.approx(w_rl)
        assert metrics["mix_weight/sft"].item() == pytest.approx(1 - w_rl)
        assert loss.item() == pytest.approx(2.0 * w_rl + 3.0 * (1 - w_rl))
    # a component with weight 0 is not computed: rl not at step 0, sft not from step 8 on
    assert [s for s, _ in rl.calls] == list(range(1, 10))
    assert [s for s, _ in sft.calls] == list(range(0, 8))
    assert all(b is batch for _, b in rl.calls) and all(b == {"own": True} for _, b in sft.calls)


def test_every_k_steps_interleaves_a_component():
    spec = _spec("+objective.components.sft.every=3", "+objective.components.sft.weight=0.5")
    rl, sft = Recorder(1.0), Recorder(1.0)
    mixed = _mixed(spec, {"rl": rl, "sft": sft})
    mixed.components[1].stream = SimpleNamespace(next_batch=lambda device: {})
    for step in range(9):
        loss, _ = mixed(None, {"input_ids": torch.zeros(1, 1)}, SimpleNamespace(step=step, micro_step=step))
        assert loss.item() == pytest.approx(1.5 if step % 3 == 2 else 1.0)
    assert [s for s, _ in sft.calls] == [2, 5, 8]


def test_an_own_stream_visits_every_row_once_per_pass_and_resumes_at_its_position():
    rows = np.arange(10 * 4).reshape(10, 4)
    stream = OwnStream(rows, seed=3, micro_batch_size=4, world_size=1, rank=0)
    drawn = []
    for _ in range(5):
        drawn += stream.indices()
        stream.position += 1
    assert sorted(drawn[:10]) == list(range(10)) and sorted(drawn[10:20]) == list(range(10))
    again = OwnStream(rows, seed=3, micro_batch_size=4, world_size=1, rank=0)
    again.position = 3
    assert again.indices() == drawn[12:16]
    # two ranks take disjoint slices of every global micro-batch
    r0 = OwnStream(rows, seed=3, micro_batch_size=2, world_size=2, rank=0)
    r1 = OwnStream(rows, seed=3, micro_batch_size=2, world_size=2, rank=1)
    assert r0.indices() + r1.indices() == drawn[:4]


# ---------------------------------------------------------------------------------------------- check and plan
@pytest.mark.parametrize("overrides, message", [
    (["+timeline.objective_weights={unit:step,points:[{at:0,value:{rl:1.0,sfx:1.0}}]}"], "no component of that name"),
    (["+timeline.objective_weights={unit:step,points:[{at:0,value:{rl:0.0,sft:0.0}}]}"], "train on nothing"),
    (["objective.components.sft.data=buffer"], "buffer rows are collected by a controller"),
    (["objective.components.sft.data={formatt:chat}"], "formatt"),
    (["objective.components.sft.data={format:prompts}"], "which objective=sft does not do"),
    (["objective.components.sft.objective=grpoo"], "grpoo"),
    (["+objective.components.sft.wieght=1"], "unknown key"),
    (["+objective.components.rl.weight=0", "+objective.components.sft.every=2"], "train on nothing"),
])
def test_bad_mixes_are_refused_at_check(overrides, message):
    from effitrain.config.inputs import check_inputs

    with pytest.raises(ConfigError, match=message):
        check_inputs(_spec(*overrides), deep=False)


def test_a_bad_mix_is_one_line_with_exit_2_from_the_console():
    from conftest import effitrain_cli

    result = effitrain_cli("check", *MIXED, "objective.components.sft.data=buffer")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("effitrain: error:")
    assert "Traceback" not in result.stderr


def test_plan_shows_each_components_weight_over_time():
    from effitrain.plan import format_section, plan_section

    cfg = compose_config([*MIXED, "train.max_steps=20", "+timeline.objective_weights={unit:fraction,"
                          "interpolate:linear,points:[{at:0,value:{rl:0.0,sft:1.0}},{at:0.5,value:{rl:1.0,"
                          "sft:0.0}}]}"]).cfg
    text = format_section(plan_section(cfg))
    assert "objective[rl]" in text and "objective[sft]" in text
    rows = {int(line.split()[0]): line.split() for line in text.splitlines() if line.strip()[:1].isdigit()}
    header = next(line.split() for line in text.splitlines() if line.startswith("step"))
    rl, sft = header.index("objective[rl]"), header.index("objective[sft]")
    assert (rows[0][rl], rows[0][sft]) == ("0", "1") and (rows[10][rl], rows[10][sft]) == ("1", "0")
    assert "loss = sum over components" in text


def test_plan_states_a_controllers_rule_and_bounds():
    from effitrain.plan import format_section, plan_sections

    sections = plan_sections(compose_config(["+recipe=sasr"]).cfg)
    text = format_section(sections[-1])
    assert "1 w.p. p" in text and "p = G_last / (G_last +" in text and "p is in (0, 1)" in text


# ---------------------------------------------------------------------------------------------- relift
def _relift(micro=2, accum=1) -> ReLIFT:
    params = SimpleNamespace(rl="rl", sft="sft", reward="exact_answer")
    return ReLIFT(params, tokenizer=SimpleNamespace(pad_token_id=0), micro_batch_size=micro, grad_accum=accum)


def _prompt_batch(prompts, answers, correct, group=3, seq_len=12):
    """Prompt rows as format=prompts makes them (the answer labelled) and each completion's exact_answer value."""
    ids, labels = [], []
    for p, a in zip(prompts, answers):
        row = p + a + [0] * (seq_len - len(p) - len(a))
        ids.append(row)
        labels.append([IGNORE_INDEX] * len(p) + a + [IGNORE_INDEX] * (seq_len - len(p) - len(a)))
    values = torch.tensor([float(c) for per_prompt in correct for c in per_prompt])
    assert values.numel() == len(prompts) * group
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
            COMPLETION_REWARDS: {"exact_answer": values, "format": torch.ones_like(values)}}


def test_relift_buffers_exactly_the_questions_whose_samples_all_fail():
    ctl = _relift(micro=2)
    state = SimpleNamespace(step=0, micro_step=0)
    assert ctl.weights(state) == {"rl": 1.0, "sft": 0.0}
    batch = _prompt_batch([[5, 6], [7], [8, 9]], [[41, 42], [43], [44]],
                          correct=[[0, 0, 0], [0, 1, 0], [0, 0, 0]])
    ctl.observe("rl", batch, state)
    assert ctl.buffer == [([5, 6], [41, 42]), ([8, 9], [44])]   # the one with a right sample is not kept
    ctl.observe("sft", batch, state)                              # only the rl component's samples count
    assert len(ctl.buffer) == 2
    # full (2 rows a step): the next step is SFT on the newest rows, the older stay
    ctl.observe("rl", _prompt_batch([[3]], [[40]], correct=[[0, 0, 0]]), state)
    assert ctl.weights(SimpleNamespace(step=1, micro_step=1)) == {"rl": 0.0, "sft": 1.0}
    assert ctl.training == [([3], [40]), ([5, 6], [41, 42])] and ctl.buffer == [([8, 9], [44])]
    batch = ctl.buffer_batch("sft", SimpleNamespace(step=1, micro_step=1), "cpu")
    assert batch["input_ids"][0, :2].tolist() == [3, 40] and batch["labels"][0, :2].tolist() == [IGNORE_INDEX, 40]
    assert batch["labels"][1, :4].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 41, 42]
    # one row left: not full, back to GRPO
    assert ctl.weights(SimpleNamespace(step=2, micro_step=2)) == {"rl": 1.0, "sft": 0.0}
    saved = json.loads(json.dumps(ctl.state_dict()))
    again = _relift(micro=2)
    again.load_state_dict(saved)
    assert again.state_dict() == ctl.state_dict()


def test_relift_sft_rows_label_only_the_demonstration():
    row = demonstration_row([1, 2, 3], [9, 8], seq_len=7, pad_id=0)
    assert row[0].tolist() == [1, 2, 3, 9, 8, 0, 0]
    assert row[1].tolist() == [IGNORE_INDEX] * 3 + [9, 8] + [IGNORE_INDEX] * 2
    assert row[2].tolist() == [0, 1, 2, 3, 4, 0, 0]


def test_relift_components_are_checked():
    with pytest.raises(ConfigError, match="must train on the failed questions"):
        validate(compose_config(["+recipe=relift", "stages.1.objective.components.sft.data=stage"]).cfg)
    with pytest.raises(ConfigError, match="no component 'rll'"):
        validate(compose_config(["+recipe=relift", "stages.1.objective.controller.rl=rll"]).cfg)
    validate(compose_config(["+recipe=relift"]).cfg)


# ---------------------------------------------------------------------------------------------- sasr
def test_sasr_warms_up_then_draws_sft_with_the_rules_probability():
    ctl = SASR(SimpleNamespace(sft="sft", rl="rl", warmup_steps=3, gamma=2.0), seed=7)
    for step in range(3):
        assert ctl.weights(SimpleNamespace(step=step)) == {"sft": 1.0, "rl": 0.0}
        ctl.record(step, 10.0 if step < 2 else 4.0)
    assert ctl.g_warmup == 4.0 and ctl.probability() == pytest.approx(4.0 / (4.0 + 2.0 * 4.0))
    # a larger SFT gradient (the policy drifted from the demonstrations) makes SFT more likely, a smaller less
    ctl.record(5, 40.0)
    assert ctl.probability() == pytest.approx(40.0 / (40.0 + 8.0))
    ctl.record(6, 0.4)
    assert ctl.probability() == pytest.approx(0.4 / 8.4)
    # the draws follow p: with p fixed, the share of SFT steps over many steps is p
    ctl.g_last = 8.0   # p = 8 / 16 = 0.5
    picks = [ctl.choose(step) for step in range(3, 4003)]
    assert np.mean(picks) == pytest.approx(0.5, abs=0.03)
    ctl.g_last = 0.8   # p = 0.8 / 8.8
    assert np.mean([ctl.choose(step) for step in range(3, 4003)]) == pytest.approx(0.8 / 8.8, abs=0.02)
    # the draw of a step depends on (seed, step) only: a resumed run draws the same
    ctl.g_last = 8.0
    again = SASR(SimpleNamespace(sft="sft", rl="rl", warmup_steps=3, gamma=2.0), seed=7)
    again.load_state_dict(json.loads(json.dumps(ctl.state_dict())))
    assert [again.choose(s) for s in range(3, 50)] == [ctl.choose(s) for s in range(3, 50)]


def test_sasr_records_the_gradient_norm_of_sft_steps_only():
    ctl = SASR(SimpleNamespace(sft="sft", rl="rl", warmup_steps=2, gamma=1.0), seed=0)
    model = torch.nn.Linear(2, 1, bias=False)
    model.weight.grad = torch.tensor([[3.0, 4.0]])
    state = SimpleNamespace(step=1, micro_step=0, model=model, engine=None)
    ctl.after_backward(state, grad_accum=1)
    state.step = 2  # the loop counts the step before step_end
    ctl.step_end(state, {"sft": 1.0, "rl": 0.0})
    assert ctl.g_warmup == ctl.g_last == pytest.approx(5.0)
    model.weight.grad = torch.tensor([[30.0, 40.0]])
    ctl.after_backward(state, grad_accum=1)
    state.step = 3
    ctl.step_end(state, {"sft": 0.0, "rl": 1.0})   # a GRPO step's norm is not the SFT gradient's
    assert ctl.g_last == pytest.approx(5.0)


# ---------------------------------------------------------------------------------------------- resume
@pytest.mark.slow
def test_sigkill_in_the_relift_stage_then_resume_repeats_the_losses(tmp_path):
    """relift's mixed stage, tiny, with a third component on a stream of its own every 2nd step: killed after its
    step-3 checkpoint and resumed, steps 4-6 log the uninterrupted run's losses, weights and buffer (the buffer
    that step 4 trains on was filled before the kill)."""
    from conftest import TINY, effitrain_cli, sigkill_at

    tiny = [o for o in TINY if not o.startswith(("train.max_steps=", "dataset.max_docs"))]
    run_args = [*tiny, "+recipe=relift", "dataset.max_docs_per_domain=200", "stages.0.train.max_steps=4",
                "stages.1.train.max_steps=6", "+stages.1.train.save_every=3",
                "stages.1.objective.components.rl.objective.group_size=4",
                "stages.1.objective.components.rl.objective.max_new_tokens=4",
                "+stages.1.objective.components.lm={objective:sft,data:{format:chat},every:2,weight:0.5}",
                "methods.answer_accuracy.examples=4", "train.keep_checkpoints=3"]

    def metrics(run_dir):
        lines = (run_dir / "stages" / "02-relift" / "metrics.jsonl").read_text().splitlines()
        return [m for m in map(json.loads, lines) if "loss" in m]

    full, killed = tmp_path / "full", tmp_path / "killed"
    result = effitrain_cli(*run_args, f"run_dir={full}", timeout=1800)   # the shared cores can be slow
    assert result.returncode == 0, result.stderr[-2000:]
    expected = metrics(full)
    assert [m["mix_weight/lm"] for m in expected] == [0.0, 0.5] * 3
    assert any(m["mix_weight/sft"] == 1.0 for m in expected[3:])   # an SFT step on the buffer after the kill

    sigkill_at([*run_args, f"run_dir={killed}"],
               killed / "stages" / "02-relift" / "checkpoints" / "step_00000003" / "COMPLETE", timeout=1800)
    result = effitrain_cli("resume", str(killed), timeout=1800)
    assert result.returncode == 0, result.stderr[-2000:]
    resumed = {m["step"]: m for m in metrics(killed)}
    assert sorted(resumed) == [m["step"] for m in expected] == list(range(1, 7))
    for m in expected[3:]:
        for key in [k for k in m if k == "loss" or k.startswith(("mix_weight/", "relift/", "lm/", "sft/", "rl/"))]:
            assert resumed[m["step"]][key] == pytest.approx(m[key], abs=1e-6), (m["step"], key)


@pytest.mark.slow
def test_sigkill_in_a_sasr_stage_then_resume_repeats_its_draws_and_losses(tmp_path):
    """sasr's one stage, tiny: a 2-step SFT warm-up, then SFT or GRPO drawn per step from the SFT gradient norms.
    Killed after its step-3 checkpoint and resumed, steps 4-6 draw the same components with the same p (G_warmup and
    G_last come back from the checkpoint) and log the uninterrupted run's losses."""
    from conftest import TINY, effitrain_cli, sigkill_at

    tiny = [o for o in TINY if not o.startswith(("train.max_steps=", "dataset.max_docs"))]
    run_args = [*tiny, "+recipe=sasr", "dataset.max_docs_per_domain=200", "train.max_steps=6", "train.save_every=3",
                "objective.controller.warmup_steps=2", "objective.components.rl.objective.group_size=4",
                "objective.components.rl.objective.max_new_tokens=4", "methods.answer_accuracy.examples=4",
                "train.keep_checkpoints=3"]

    def metrics(run_dir):
        return [m for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in m]

    full, killed = tmp_path / "full", tmp_path / "killed"
    result = effitrain_cli(*run_args, f"run_dir={full}", timeout=1800)
    assert result.returncode == 0, result.stderr[-2000:]
    expected = metrics(full)
    assert [m["mix_weight/sft"] for m in expected[:2]] == [1.0, 1.0]          # the warm-up
    assert {m["mix_weight/sft"] for m in expected[2:]} == {0.0, 1.0}          # both kinds drawn after it
    assert all(0 < m["sasr/p"] < 1 for m in expected[2:])

    sigkill_at([*run_args, f"run_dir={killed}"], killed / "checkpoints" / "step_00000003" / "COMPLETE",
               timeout=1800)
    result = effitrain_cli("resume", str(killed), timeout=1800)
    assert result.returncode == 0, result.stderr[-2000:]
    resumed = {m["step"]: m for m in metrics(killed)}
    assert sorted(resumed) == [m["step"] for m in expected] == list(range(1, 7))
    for m in expected[3:]:
        for key in [k for k in m if k == "loss" or k.startswith(("mix_weight/", "sasr/", "sft/", "rl/"))]:
            assert resumed[m["step"]][key] == pytest.approx(m[key], abs=1e-6), (m["step"], key)


def test_a_mixed_stage_resumed_from_its_state_repeats_the_uninterrupted_losses(tmp_path):
    """The objective's own state in process (no DeepSpeed): real grpo and sft components on a tiny Llama, relift's
    buffer and a third component on a stream of its own every second step.  Stopped after 3 steps, its state, the
    model and the optimizer saved to a file and loaded into fresh objects, steps 3-6 repeat the uninterrupted run's
    losses and weights, and the final states agree (the SIGKILL test above does the same through the engine)."""
    import datasets
    import transformers

    from effitrain.config.blocks import load_builtin_blocks
    from effitrain.config.blocks.objective_mixed import parse_component
    from effitrain.data import arithmetic_chat
    from effitrain.data.tokenizer import train_bpe
    from effitrain.objectives.grpo import GRPO
    from effitrain.objectives.rewards import build_rewards
    from effitrain.objectives.sft import SFT
    from effitrain.registry import REGISTRY

    load_builtin_blocks()
    train, _ = arithmetic_chat.splits(60, 0)
    texts = [f"<|user|>\n{e['question']}\n<|assistant|>\n{e['answer']}" for e in train]
    train_bpe(datasets.Dataset.from_dict({"text": texts}), 300, tmp_path / "bpe")
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "bpe"))
    rows = np.stack([demonstration_row(tok(f"<|user|>\n{e['question']}\n<|assistant|>\n")["input_ids"],
                                       tok(str(e["answer"]))["input_ids"] + [tok.eos_token_id], 24, tok.pad_token_id)
                     for e in train])
    rewards = build_rewards([REGISTRY.parse("reward", {"name": "exact_answer"}, "r")])

    def fresh():
        torch.manual_seed(0)
        config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        model = transformers.LlamaForCausalLM(config)
        specs = {n: parse_component(n, raw, n) for n, raw in {
            "rl": {"objective": "grpo", "data": "stage"}, "sft": {"objective": "sft", "data": "buffer"},
            "lm": {"objective": "sft", "data": {"format": "chat"}, "every": 2, "weight": 0.5}}.items()}
        rl = GRPO(tok, rewards, None, group_size=4, max_new_tokens=3, temperature=1.0, beta=0.0, epsilon=0.2,
                  epsilon_high=None, scale_rewards="group", loss_type="grpo", seed=0)
        components = [Component(specs["rl"], rl, None), Component(specs["sft"], SFT(), None),
                      Component(specs["lm"], SFT(), OwnStream(rows, seed=9, micro_batch_size=2, world_size=1, rank=0))]
        controller = ReLIFT(SimpleNamespace(rl="rl", sft="sft", reward="exact_answer"), tokenizer=tok,
                            micro_batch_size=2, grad_accum=1)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2), Mixed(components, controller, grad_accum=1)

    def steps(model, optimizer, mixed, start, end):
        out = []
        for step in range(start, end):
            batch = {k: v for k, v in zip(("input_ids", "labels", "position_ids"),
                                          torch.from_numpy(rows[[2 * step, 2 * step + 1]]).long().unbind(1))}
            loss, metrics = mixed(model, batch, SimpleNamespace(step=step, micro_step=step, rank=0, timeline=None))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            out.append((loss.item(), {k: v.item() for k, v in metrics.items() if k.startswith(("mix_", "relift"))}))
        return out

    model, optimizer, full = fresh()
    expected = steps(model, optimizer, full, 0, 7)
    assert {w["mix_weight/sft"] for _, w in expected} == {0.0, 1.0}         # SFT steps on the buffer happened
    assert [w["mix_weight/lm"] for _, w in expected] == [0.0, 0.5] * 3 + [0.0]

    model, optimizer, mixed = fresh()
    head = steps(model, optimizer, mixed, 0, 3)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "objective": mixed.state_dict()},
               tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    model, optimizer, resumed = fresh()
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    resumed.load_state_dict(saved["objective"])
    tail = steps(model, optimizer, resumed, 3, 7)
    assert [w for _, w in head + tail] == [w for _, w in expected]
    assert [loss for loss, _ in head + tail] == pytest.approx([loss for loss, _ in expected], abs=1e-6)
    final, resumed_final = full.state_dict(), resumed.state_dict()
    assert resumed_final["controller"] == final["controller"] and resumed_final["streams"] == final["streams"]
