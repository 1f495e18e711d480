"""``methods: {answer_accuracy: {...}}``: generation-based evaluation on held-out checkable questions.

At every evaluation the model answers the held-out arithmetic questions of the built-in instruction set
(:mod:`effitrain.data.arithmetic_chat`, the same eval split the eval loss uses): each prompt is the user message
rendered with the chat template and tokenized as in training (:func:`effitrain.data.chat.prompt_ids`), the answer is
generated greedily (``do_sample=False``, no logits processor of the checkpoint's ``generation_config.json``:
:mod:`effitrain.objectives.generation`) up to EOS or ``max_new_tokens``, and it is right when the decoded text,
stripped of surrounding whitespace, is exactly the decimal answer (``extract: full``), or when the answer extracted
from it (``boxed``, ``last_number``: :data:`effitrain.objectives.rewards.EXTRACTORS`) equals it.  Logged with the
eval losses: ``eval_accuracy`` (share right) and ``eval_response_tokens`` (mean generated tokens, EOS included);
with ``control_tokens``, ``eval_share_NAME``: the share of answers that begin with each (Thinkless's modes, whose
tokens decoding keeps), and ``eval_accuracy_NAME``: the accuracy of those answers (0 when there are none).

Reward statistics: when the run's objective is ``grpo``, its own reward blocks also score the greedy answers (the
held-out reference answers in the dataset's ``answer_style``), logged as ``eval_reward`` (their weighted sum,
averaged over the questions), ``eval_reward_std`` and ``eval_reward_NAME`` per reward, so an RL stage's held-out
reward is on the same curve as its training reward.

Multi-turn stages (``objective.grpo.turns`` > 1): after the greedy first answers the stage's environment replies to
each (with the held-out reference) and the model answers again greedily in the same conversation, for every turn:
``eval_accuracy_tN`` (``eval_accuracy`` stays the first answer's), ``eval_wrong_to_right`` and
``eval_right_to_wrong`` (shares of the questions whose last answer is right where the first was wrong, and the
reverse) -- SCoRe's Accuracy@t1, Accuracy@t2, Delta^{i->c} and Delta^{c->i}.

Prompts are left-padded into batches with an attention mask (transformers derives the positions from it), so a
prompt's answer does not depend on the other prompts of its batch.  Every rank answers all questions (they are few);
the model's parameters must be whole (ZeRO <= 2, refused under ZeRO-3 by a rule).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from effitrain.engine.events import Hook


def is_exact_answer(response: str, answer: int) -> bool:
    """The response is the answer's decimal digits (an optional minus), nothing more than surrounding space."""
    text = response.strip()
    return text.lstrip("-").isdigit() and text == str(answer)


class AnswerAccuracy(Hook):
    name = "answer_accuracy"

    def __init__(self, tokenizer: Any, *, examples: int, max_new_tokens: int, batch_size: int,
                 extract: str = "full", control_tokens: tuple = ()) -> None:
        self.tokenizer = tokenizer
        self.control_tokens = tuple(control_tokens)
        self.examples, self.max_new_tokens, self.batch_size = examples, max_new_tokens, batch_size
        self.extract = extract
        self.prompts: Optional[list[list[int]]] = None
        self.answers: list[int] = []
        self.references: list[str] = []
        self.rewards: list = []
        self.turns, self.environment = 1, None   # set from a multi-turn grpo objective (objective.grpo.turns)

    def _questions(self, state: Any) -> None:
        from effitrain.data import arithmetic_chat, chat

        data = state.spec.block("dataset").params
        _, held_out = arithmetic_chat.splits(data.max_docs_per_domain, self.examples, seed=data.seed,
                                             max_digits=data.max_digits, style=data.answer_style)
        self.prompts = [chat.prompt_ids(self.tokenizer, e["messages"][:1]) for e in held_out]
        self.answers = [e["answer"] for e in held_out]
        self.references = [e["messages"][1]["content"] for e in held_out]
        objective = state.spec.block("objective")
        if objective.name == "mixed":  # its grpo component's rewards, when it has one (relift, sasr)
            objective = next((c.objective for c in objective.params.parsed if c.objective.name == "grpo"), objective)
        if objective.name == "grpo":
            from effitrain.objectives.rewards import build_rewards

            self.rewards = build_rewards(objective.params.reward_blocks)
            if getattr(objective.params, "turns", 1) > 1:  # a multi-turn stage: its environment answers turn 1
                self.turns, self.environment = objective.params.turns, objective.params.environment_block.build()

    def is_right(self, text: str, answer: int) -> bool:
        if self.extract == "full":
            return is_exact_answer(text, answer)
        from effitrain.objectives.rewards import EXTRACTORS, same_answer

        return same_answer(EXTRACTORS[self.extract](text), str(answer))

    def reward_metrics(self, texts: list[str], lengths: list[int]) -> dict[str, float]:
        if not self.rewards:
            return {}
        import statistics

        total = [0.0] * len(texts)
        out = {}
        for name, weight, fn in self.rewards:
            values = fn(texts, self.references, lengths)
            out[f"eval_reward_{name}"] = sum(values) / len(values)
            total = [t + weight * v for t, v in zip(total, values)]
        out["eval_reward"] = sum(total) / len(total)
        out["eval_reward_std"] = statistics.pstdev(total)
        return out

    @torch.no_grad()
    def responses(self, model: Any, prompts: list[list[int]]) -> tuple[list[str], list[int]]:
        """Greedy answers (decoded, special tokens dropped) and their lengths in tokens."""
        answers = self.answer_ids(model, prompts)
        return [self.tokenizer.decode(a, skip_special_tokens=True) for a in answers], [len(a) for a in answers]

    def later_turns(self, model: Any, first: list[list[int]], texts: list[str]) -> dict[str, float]:
        """A multi-turn stage's held-out figures: after each greedy answer its environment replies (the reference is
        the held-out answer) and the model answers again, greedily; the accuracy of every turn and the shares of
        questions turned from wrong to right and from right to wrong between the first and the last turn."""
        from effitrain.data import chat

        contexts = [list(p) for p in self.prompts]
        answers, right = first, [self.is_right(t, a) for t, a in zip(texts, self.answers)]
        first_right = right
        out: dict[str, float] = {}
        for turn in range(2, self.turns + 1):
            for j, (answer, text) in enumerate(zip(answers, texts)):
                reply = self.environment.reply(text, self.references[j], turn - 1)
                contexts[j] += list(answer) + chat.follow_up_ids(self.tokenizer, reply)
            answers = self.answer_ids(model, contexts)
            texts = [self.tokenizer.decode(a, skip_special_tokens=True) for a in answers]
            right = [self.is_right(t, a) for t, a in zip(texts, self.answers)]
            out[f"eval_accuracy_t{turn}"] = sum(right) / max(len(right), 1)
        count = max(len(right), 1)
        out["eval_wrong_to_right"] = sum(not a and b for a, b in zip(first_right, right)) / count
        out["eval_right_to_wrong"] = sum(a and not b for a, b in zip(first_right, right)) / count
        return out

    @torch.no_grad()
    def answer_ids(self, model: Any, prompts: list[list[int]]) -> list[list[int]]:
        """Greedy answers as token ids, each up to and including its first EOS."""
        from effitrain.objectives.generation import generate_plainly, plain_generation_config

        device = next(model.parameters()).device
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        # greedy on the model's own logits: a checkpoint's repetition penalty or banned n-grams would grade another
        # decoder than the one GRPO trains
        config = plain_generation_config(do_sample=False, max_new_tokens=self.max_new_tokens, pad_token_id=pad,
                                         eos_token_id=eos)
        answers = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start:start + self.batch_size]
            width = max(map(len, chunk))
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
            out = generate_plainly(model, config, input_ids=ids, attention_mask=mask)
            for row in out[:, width:].tolist():
                if eos in row:
                    row = row[:row.index(eos) + 1]
                answers.append(row)
        return answers

    def on_eval_end(self, state: Any) -> None:
        if self.prompts is None:
            self._questions(state)
        model = state.model
        was_training = model.training
        model.eval()
        try:
            first = self.answer_ids(model, self.prompts)
            texts = [self.tokenizer.decode(a, skip_special_tokens=True) for a in first]
            lengths = [len(a) for a in first]
            if self.turns > 1:
                state.eval_metrics.update(self.later_turns(model, first, texts))
        finally:
            model.train(was_training)
        right = sum(self.is_right(t, a) for t, a in zip(texts, self.answers))
        state.eval_metrics["eval_accuracy"] = right / max(len(self.answers), 1)
        state.eval_metrics["eval_response_tokens"] = sum(lengths) / max(len(lengths), 1)
        state.eval_metrics.update(self.reward_metrics(texts, lengths))
        state.eval_metrics.update(self.mode_metrics(texts))

    def mode_metrics(self, texts: list[str]) -> dict[str, float]:
        """The share of answers beginning with each control token, and their accuracy."""
        out = {}
        for token in self.control_tokens:
            name = token.strip("<>|") or token
            chosen = [(t, a) for t, a in zip(texts, self.answers) if t.lstrip().startswith(token)]
            out[f"eval_share_{name}"] = len(chosen) / max(len(texts), 1)
            out[f"eval_accuracy_{name}"] = sum(self.is_right(t, a) for t, a in chosen) / max(len(chosen), 1)
        return out


def build_answer_accuracy(params: Any, *, tokenizer: Any = None, **context: Any) -> AnswerAccuracy:
    return AnswerAccuracy(tokenizer, examples=params.examples, max_new_tokens=params.max_new_tokens,
                          batch_size=params.batch_size, extract=params.extract,
                          control_tokens=tuple(getattr(params, "control_tokens", ())))
