"""Multi-turn GRPO and the ``score`` recipe (SCoRe, 2409.12917): the environment's message inserted as the chat
template renders it and masked out of the loss, the shaped reward on hand-computed cases, stage I's KL on the first
turn only, the environments' replies, the check-time refusals, the held-out turn-2 evaluation, and a SIGKILL in a
multi-turn stage whose resume repeats the losses."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from effitrain.config.blocks import load_builtin_blocks
from effitrain.config.compose import compose_config
from effitrain.config.spec import validate
from effitrain.data import chat
from effitrain.data.rows import IGNORE_INDEX
from effitrain.objectives import grpo, grpo_turns
from effitrain.registry import REGISTRY, ConfigError
from test_grpo import _prompt_batch, tiny_llama, tokenizer  # noqa: F401 (tokenizer: the module's fixture)

load_builtin_blocks()
SCORE_MESSAGE = REGISTRY.parse("environment", {"name": "scripted_user"}).params.message


class Scripted:
    """A sampler that answers with fixed texts (each + EOS, then padding): the conversations are known exactly."""

    def __init__(self, tok, answers: list[str]) -> None:
        self.tok, self.answers = tok, answers
        self.contexts: list[list[int]] = []

    def sample(self, module, ids, mask, seed):
        self.contexts += [[t for t, m in zip(r, k) if m] for r, k in zip(ids.tolist(), mask.tolist())]
        rows = [self.tok(a, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id] for a in self.answers]
        width = max(map(len, rows)) + 1
        return torch.tensor([r + [self.tok.pad_token_id] * (width - len(r)) for r in rows])


def _objective(tok, model, *, first: list[str], second: list[str], group_size: int, **options) -> grpo.GRPO:
    block = REGISTRY.parse("objective", {"name": "grpo", "rewards": [{"name": "exact_answer"}], "turns": 2,
                                         "environment": {"name": "scripted_user"}, "group_size": group_size,
                                         "max_new_tokens": 4, **options})
    obj = grpo_turns.build(block.params, model=model, tokenizer=tok)
    obj.sampler, obj.follow_up = Scripted(tok, first), Scripted(tok, second)
    return obj


STATE = SimpleNamespace(micro_step=0, rank=0, step=1)


def _record_policy_inputs(obj: grpo.GRPO) -> dict:
    """The sequences the policy's log-probabilities are computed on (ids, attention, prompt width), recorded as the
    objective computes them."""
    seen: dict = {}
    original = obj.policy_logps

    def spy(model, ids, attention, width):
        seen.update(ids=ids, attention=attention, width=width)
        return original(model, ids, attention, width)

    obj.policy_logps = spy
    return seen


def test_one_turn_is_grpo_as_before(tokenizer):
    block = REGISTRY.parse("objective", {"name": "grpo"})
    obj = grpo_turns.build(block.params, model=tiny_llama(len(tokenizer)), tokenizer=tokenizer)
    assert type(obj) is grpo.GRPO


def test_the_environments_message_is_inserted_as_the_template_renders_it_and_masked_out(tokenizer, layout):
    """A 2-turn conversation with known answers: the trained sequence is token for token the tokenised
    conversation [question, answer 1, SCoRe's message, answer 2], the loss mask is 1 exactly where that
    conversation's labels are (both answers with their EOS) and 0 on the message and its headers, and turn 2 was
    sampled in that very context."""
    model = tiny_llama(len(tokenizer))
    obj = _objective(tokenizer, model, first=["12", "7"], second=["13", "7"], group_size=2,
                     turn_betas=[0.0, 0.0])
    batch, examples = _prompt_batch(tokenizer, 1)
    seen = _record_policy_inputs(obj)
    loss, metrics = obj(model, batch, STATE)
    question = examples[0]["messages"][0]
    for row, (a1, a2) in enumerate([("12", "13"), ("7", "7")]):
        convo = [question, {"role": "assistant", "content": a1}, {"role": "user", "content": SCORE_MESSAGE},
                 {"role": "assistant", "content": a2}]
        ids, labels = chat.encode_conversation(tokenizer, convo)
        real = seen["attention"][row].bool()
        assert seen["ids"][row][real].tolist() == ids
        # the loss mask over the tokens after the prompt, against the conversation's labels there
        prompt = len(chat.prompt_ids(tokenizer, [question]))
        got = torch.zeros(len(ids), dtype=torch.long)
        got[prompt:] = (layout["turn_of"][row][:len(ids) - prompt] >= 0).long()
        assert got.tolist() == [int(label != IGNORE_INDEX) for label in labels]
        message = chat.follow_up_ids(tokenizer, SCORE_MESSAGE)
        assert sum(1 for label in labels if label == IGNORE_INDEX) == prompt + len(message)
        # turn 2 was asked with the conversation up to the second assistant header
        second = tokenizer(a2, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert ids[-len(second):] == second and obj.follow_up.contexts[row] == ids[:-len(second)]


@pytest.fixture
def layout(monkeypatch):
    """The turn of every token after the prompt (``[M, L]``, ENV on the environment's tokens and the padding) of
    the losses taken, as the objective laid them out."""
    seen = {}
    original = grpo_turns.conversation_tokens

    def spy(segments, pad_id, device):
        ids, attention, turn_of = original(segments, pad_id, device)
        seen["turn_of"] = turn_of
        return ids, attention, turn_of

    monkeypatch.setattr(grpo_turns, "conversation_tokens", spy)
    return seen


def test_the_shaped_reward_on_hand_computed_cases():
    """Conversations (wrong -> right), (right -> wrong), (right -> right), (wrong -> wrong); alpha = 10."""
    raw = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 1.0, 0.0]])   # [turn, conversation]
    shaped = grpo_turns.shaped_rewards(raw, [1.0, 1.0], 10.0)
    assert shaped[0].tolist() == [0.0, 1.0, 1.0, 0.0]                   # turn 1: its own reward
    assert shaped[1].tolist() == [11.0, -10.0, 1.0, 0.0]                # r2 + 10 (r2 - r1)
    stage1 = grpo_turns.shaped_rewards(raw, [0.0, 1.0], 0.0)
    assert stage1.tolist() == [[0.0] * 4, [1.0, 0.0, 1.0, 0.0]]


def test_each_turns_tokens_get_their_turns_shaped_advantage(tokenizer, layout):
    """Through the objective: four conversations of one prompt (right answer 12+... known), group-normalised per
    turn, every policy token carries its turn's advantage and the message's tokens none."""
    batch, examples = _prompt_batch(tokenizer, 1)
    answer = str(examples[0]["answer"])
    wrong = str(examples[0]["answer"] + 1)
    model = tiny_llama(len(tokenizer))
    # (wrong -> right), (right -> wrong), (right -> right), (wrong -> wrong)
    obj = _objective(tokenizer, model, first=[wrong, answer, answer, wrong], second=[answer, wrong, answer, wrong],
                     group_size=4, turn_reward_weights=[1.0, 1.0], progress_bonus=10.0, beta=0.0)
    seen = {}
    original = obj.loss

    def spy(logps, old, ref, advantages, mask, entropy, token_weights=None, beta=None):
        seen.update(advantages=advantages, mask=mask)
        return original(logps, old, ref, advantages, mask, entropy, token_weights, beta=beta)

    obj.loss = spy
    _, metrics = obj(model, batch, STATE)
    s1, s2 = torch.tensor([0.0, 1.0, 1.0, 0.0]), torch.tensor([11.0, -10.0, 1.0, 0.0])
    a1, a2 = grpo.group_advantages(s1, 4), grpo.group_advantages(s2, 4)
    for row in range(4):
        turns = layout["turn_of"][row]
        adv = seen["advantages"][row]
        assert torch.allclose(adv[turns == 0], a1[row].expand(int((turns == 0).sum())))
        assert torch.allclose(adv[turns == 1], a2[row].expand(int((turns == 1).sum())))
        assert (adv[turns == grpo_turns.ENV] == 0).all() and (seen["mask"][row][turns < 0] == 0).all()
    assert metrics["accuracy_t1"].item() == 0.5 and metrics["accuracy_t2"].item() == 0.5
    assert metrics["wrong_to_right"].item() == 0.25 and metrics["right_to_wrong"].item() == 0.25


def test_a_methods_token_weights_are_refused_by_a_multi_turn_rollout(tokenizer):
    """Per-token weights (batch['token_weights']) address one answer's tokens; a multi-turn rollout does not read
    them, so it says so rather than training on a loss the method did not ask for."""
    from effitrain.errors import RunFailed
    from effitrain.objectives.common import TOKEN_WEIGHTS

    batch, examples = _prompt_batch(tokenizer, 1)
    model = tiny_llama(len(tokenizer))
    answer = str(examples[0]["answer"])
    obj = _objective(tokenizer, model, first=[answer] * 2, second=[answer] * 2, group_size=2, beta=0.0)
    batch[TOKEN_WEIGHTS] = lambda completions, mask: mask.float()
    with pytest.raises(RunFailed, match="turns=2: a method set batch\\['token_weights'\\]"):
        obj(model, batch, STATE)


def test_stage_one_puts_the_kl_on_the_first_turn_only(tokenizer, layout):
    """Stage I: turn_betas [0.1, 0] and no reward on turn 1.  With every answer equally rewarded (advantages 0) the
    loss is the KL term alone, and it equals the hand-computed k3 KL to the reference summed over turn 1's tokens
    only (times 0.1), averaged per conversation over all its policy tokens (loss_type grpo)."""
    batch, examples = _prompt_batch(tokenizer, 1)
    model = tiny_llama(len(tokenizer), seed=3)
    obj = _objective(tokenizer, model, first=["5", "6"], second=["7", "8"], group_size=2,
                     turn_reward_weights=[0.0, 1.0], turn_betas=[0.1, 0.0])
    obj.reference = tiny_llama(len(tokenizer), seed=4)          # a reference that differs from the policy
    seen = _record_policy_inputs(obj)
    loss, metrics = obj(model, batch, STATE)
    with torch.no_grad():
        pol = obj.logps(model, seen["ids"], seen["attention"], seen["width"])
        ref = obj.logps(obj.reference, seen["ids"], seen["attention"], seen["width"])
    expected = []
    for row in range(2):
        turns = layout["turn_of"][row]
        delta = (ref - pol)[row]
        kl = torch.exp(delta) - delta - 1
        expected.append(0.1 * kl[turns == 0].sum() / (turns >= 0).sum())
        assert kl[turns == 1].sum() > 0                             # turn 2 differs too, and is not charged
    assert loss.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-4)
    # the same with the reference equal to the policy: no KL at all (the stage starts at zero)
    obj.reference = model
    assert obj(model, batch, STATE)[0].item() == pytest.approx(0.0, abs=1e-7)


def test_the_environments_replies():
    scripted = REGISTRY.parse("environment", {"name": "scripted_user", "message": "Check again."}).build()
    assert scripted.reply("41", "42", 1) == "Check again."
    verifier = REGISTRY.parse("environment", {"name": "verifier", "extract": "boxed"}).build()
    assert verifier.reply("so \\boxed{42}", "<think>40+2</think> \\boxed{42}", 1) == "Your answer is correct."
    assert verifier.reply("\\boxed{41}", "\\boxed{42}", 1) == "Your answer is incorrect. Please correct it."
    assert verifier.reply("no box", "\\boxed{42}", 1) == "Your answer is incorrect. Please correct it."


@pytest.mark.parametrize("overrides, message", [
    (["stages.2.objective.environment.name=scripted_usr"],
     "objective.environment.name: unknown environment 'scripted_usr' (did you mean 'scripted_user'?); valid: "
     "scripted_user, verifier"),
    (["+stages.1.objective.environment.mesage=hi"], "objective.environment.mesage: unknown key (did you mean "
                                                    "'message'?)"),
    (["+stages.1.objective.environment.message= "], "objective.environment.message: empty"),
    (["~stages.1.objective.environment"], "objective.environment: turns: 2 needs an environment"),
    (["stages.1.objective.turns=1"], "objective.environment: only used when objective.turns > 1"),
    (["stages.2.objective.turn_betas=[0.1]"], "objective.turn_betas: [0.1] has 1 values for 2 turns"),
    (["+stages.1.objective.generator={backend:vllm}"], "multi-turn rollouts (turns: 2) sample with the policy's"),
    # decoupled GRPO (thinkless) weighs one answer's first token; a conversation has one answer per turn
    (["+stages.1.objective.decoupled_alpha=0.001"], "objective.decoupled_alpha: decoupled GRPO weighs the first "
                                                     "token of a single answer and does not apply to multi-turn"),
])
def test_bad_multi_turn_settings_are_one_line_at_check(overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(compose_config(["+recipe=score", *overrides]).cfg)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_check_names_a_misspelt_environment_in_one_line():
    from conftest import effitrain_cli

    result = effitrain_cli("check", "+recipe=score", "stages.1.objective.environment.name=verifer")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "effitrain: error: stages.stage1: objective.environment.name: unknown environment 'verifer' (did you mean "
        "'verifier'?); valid: scripted_user, verifier"]


def test_held_out_evaluation_answers_turn_two_after_the_environment(tokenizer):
    """answer_accuracy on a multi-turn stage: the second greedy answer is given the conversation with the
    environment's reply, and the shares of wrong->right / right->wrong are counted against the first answers."""
    from effitrain.methods.answer_accuracy import AnswerAccuracy

    hook = AnswerAccuracy(tokenizer, examples=3, max_new_tokens=4, batch_size=8)
    hook.prompts = [[5, 6], [7, 8], [9, 10]]
    hook.answers, hook.references = [1, 2, 3], ["1", "2", "3"]
    hook.turns = 2
    hook.environment = REGISTRY.parse("environment", {"name": "scripted_user", "message": "Again."}).build()
    asked = []
    second = {1: "1", 2: "5", 3: "3"}

    def answer_ids(model, contexts):
        asked.extend(contexts)
        return [tokenizer(second[i + 1], add_special_tokens=False)["input_ids"] for i in range(len(contexts))]

    hook.answer_ids = answer_ids
    first = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("0", "2", "3")]
    out = hook.later_turns(None, first, ["0", "2", "3"])
    reply = chat.follow_up_ids(tokenizer, "Again.")
    assert asked == [p + a + reply for p, a in zip(hook.prompts, first)]
    assert out == {"eval_accuracy_t2": pytest.approx(2 / 3), "eval_wrong_to_right": pytest.approx(1 / 3),
                   "eval_right_to_wrong": pytest.approx(1 / 3)}


@pytest.mark.slow
def test_sigkill_in_a_multi_turn_stage_then_resume_repeats_the_losses(tmp_path):
    """A multi-turn GRPO stage with stage II's settings (per-turn KL, progress bonus), tiny and from scratch, killed
    right after its step-3 checkpoint and resumed: steps 4-6 log the same losses, per-turn rewards and KL as the
    uninterrupted run (the turn-2 samples depend on the restored policy, the turn seeds and the environment's
    replies).  One stage, so that the test stays short: what the recipe's stages add is the init and reference."""
    from conftest import TINY, effitrain_cli, sigkill_at

    tiny = [o for o in TINY if not o.startswith(("train.max_steps=", "train.micro_batch_size="))]
    run_args = [*tiny, "objective=grpo", "dataset=chat_demo", "dataset.format=prompts", "train.micro_batch_size=2",
                "train.max_steps=6", "train.save_every=3", "train.keep_checkpoints=3", "objective.group_size=2",
                "objective.max_new_tokens=3", "+objective.turns=2", "+objective.environment={name:scripted_user}",
                "+objective.turn_betas=[0.01,0.01]", "+objective.progress_bonus=10.0",
                # a model this small never answers right: the length reward gives the groups differing rewards
                "objective.rewards=[{name:exact_answer},{name:length,max_tokens:3,gated:false}]"]

    def metrics(run_dir):
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return [m for m in map(json.loads, lines) if "loss" in m]

    full, killed = tmp_path / "full", tmp_path / "killed"
    result = effitrain_cli(*run_args, f"run_dir={full}")
    assert result.returncode == 0, result.stderr[-2000:]
    expected = metrics(full)
    assert all("reward_t2" in m and "kl" in m for m in expected)
    assert len({round(m["loss"], 8) for m in expected}) > 1        # the figures move: a resume could differ

    sigkill_at([*run_args, f"run_dir={killed}"], killed / "checkpoints" / "step_00000003" / "COMPLETE")
    result = effitrain_cli("resume", str(killed))
    assert result.returncode == 0, result.stderr[-2000:]
    resumed = {m["step"]: m for m in metrics(killed)}
    assert sorted(resumed) == [m["step"] for m in expected] == list(range(1, 7))
    for m in expected[3:]:
        for key in ("loss", "reward_t1", "reward_t2", "kl", "completion_tokens"):
            assert resumed[m["step"]][key] == pytest.approx(m[key], abs=1e-6), (m["step"], key)
