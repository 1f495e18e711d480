"""The built-in instruction set: procedural arithmetic questions with checkable answers, so post-training runs and
its tests need no download.

Example ``i`` of a split is drawn from ``random.Random(f"{seed}:{split}:{i}")``: an operation (``+``, ``-``, ``*``)
and operands of 1..``max_digits`` digits (``*`` takes a 1-digit right operand, so answers stay short).  The
conversation is ``[{"role": "user", "content": "What is 37+45?"}, {"role": "assistant", "content": "82"}]``.

The preference variant adds a rejected conversation with a wrong answer: the right one plus a non-zero offset of
-10..10 drawn from the same generator (near misses, the errors a small model makes), so chosen and rejected share
the prompt.

Train and eval never share a question: eval questions that occur among the train questions (or earlier in eval)
are skipped and further ones drawn (the check is over the question text), so held-out accuracy measures
generalisation, not recall.
"""

from __future__ import annotations

import random
import re
from typing import Optional

OPERATIONS = ("+", "-", "*")
DOMAIN = "arithmetic_chat"
#: how the questions are split into domains (data distributions): one domain, by operation, by the digits of the
#: longer operand (a difficulty), or by both (``add_2d``)
DOMAIN_SPLITS = ("one", "operation", "digits", "operation_digits")
_OPERATION_NAMES = {"+": "add", "-": "sub", "*": "mul"}
_QUESTION = re.compile(r"What is (-?\d+)([+\-*])(-?\d+)\?")


def problem(seed: int, split: str, index: int, max_digits: int) -> tuple[str, int, int]:
    """``(question, answer, wrong answer)`` of example ``index`` of ``split``."""
    rng = random.Random(f"{seed}:{split}:{index}")
    op = rng.choice(OPERATIONS)
    digits = rng.randint(1, max_digits)
    a = rng.randint(0, 10 ** digits - 1)
    b = rng.randint(0, 9) if op == "*" else rng.randint(0, 10 ** rng.randint(1, max_digits) - 1)
    answer = a + b if op == "+" else a - b if op == "-" else a * b
    offset = rng.choice([d for d in range(-10, 11) if d])
    return f"What is {a}{op}{b}?", answer, answer + offset


def answer_of(question: str) -> Optional[int]:
    """The right answer of a question this module wrote (None for any other text)."""
    m = _QUESTION.fullmatch(question.strip())
    if m is None:
        return None
    a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
    return a + b if op == "+" else a - b if op == "-" else a * b


def domain_of(question: str, split: str) -> str:
    """The domain label of a question this module wrote, under one of :data:`DOMAIN_SPLITS`: ``add``/``sub``/``mul``
    (operation), ``1d``/``2d``/... (digits of the longer operand: the larger the harder) or ``add_2d`` (both)."""
    if split == "one":
        return DOMAIN
    m = _QUESTION.fullmatch(question.strip())
    if m is None:
        raise ValueError(f"not an arithmetic_chat question: {question!r}")
    operation = _OPERATION_NAMES[m.group(2)]
    digits = f"{max(len(m.group(1).lstrip('-')), len(m.group(3).lstrip('-')))}d"
    return {"operation": operation, "digits": digits, "operation_digits": f"{operation}_{digits}"}[split]


ANSWER_STYLES = ("plain", "think_boxed", "sentence", "plain_or_sentence", "thinkless")
#: ``plain_or_sentence`` answers each example in one of these, drawn per example: a model fine-tuned on it answers
#: in either style at random, the unconditioned start that principle-following (``objective: sami``) works from
MIXED_STYLES = ("plain", "sentence")
#: Thinkless's control tokens (2505.13379): the first token of an answer chooses its mode, a bare answer after
#: ``<short>``, a worked reasoning closed by ``</think>`` after ``<think>``.  ``answer_style: thinkless`` adds them to
#: the tokenizer (:func:`add_control_tokens`)
SHORT, THINK, THINK_END = "<short>", "<think>", "</think>"
CONTROL_TOKENS = (SHORT, THINK)


def worked_steps(question: str) -> str:
    """The arithmetic written out in steps, splitting an operand into its tens and its ones: ``37+45: 37+40=77,
    77+5=82``; ``37*4: 30*4=120, 7*4=28, 120+28=148`` (one step when there is nothing to split)."""
    m = _QUESTION.fullmatch(question.strip())
    if m is None:
        raise ValueError(f"not an arithmetic_chat question: {question!r}")
    a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
    head = f"{a}{op}{b}: "
    if op == "*":
        tens, ones = a - a % 10, a % 10
        if tens == 0:
            return head + f"{a}*{b}={a * b}"
        return head + f"{tens}*{b}={tens * b}, {ones}*{b}={ones * b}, {tens * b}+{ones * b}={a * b}"
    tens, ones = b - b % 10, b % 10
    sign = 1 if op == "+" else -1
    if tens == 0 or ones == 0:
        return head + f"{a}{op}{b}={a + sign * b}"
    partial = a + sign * tens
    return head + f"{a}{op}{tens}={partial}, {partial}{op}{ones}={partial + sign * ones}"


def response(question: str, answer: int, style: str = "plain") -> str:
    """The assistant's text: ``plain`` is the number; ``sentence`` says it in a sentence ("The answer is 82.");
    ``think_boxed`` restates the sum in ``<think>`` tags and boxes the number, the response format of math RL data
    that the ``format`` and ``length`` rewards check; ``thinkless`` is the reasoning answer of the pair
    :func:`thinkless_responses` writes."""
    if style == "plain":
        return str(answer)
    if style == "sentence":
        return f"The answer is {answer}."
    if style == "thinkless":
        return thinkless_responses(question, answer)[0]
    expression = question.removeprefix("What is ").removesuffix("?")
    return f"<think>{expression}</think> \\boxed{{{answer}}}"


def thinkless_responses(question: str, answer: int) -> tuple[str, str]:
    """Thinkless's warm-up pair for one question (its "paired long and short responses"): the reasoning answer,
    ``<think>`` + the worked steps + ``</think> \\boxed{N}``, and the short one, ``<short>\\boxed{N}``."""
    return (f"{THINK}{worked_steps(question)}{THINK_END} \\boxed{{{answer}}}", f"{SHORT}\\boxed{{{answer}}}")


def add_control_tokens(tokenizer):
    """The control tokens added to the tokenizer, one id each, never split or merged with the text around them.
    Added as non-special tokens (the way DeepSeek-R1's tokenizer holds ``<think>``): decoding with
    ``skip_special_tokens`` keeps them, so the rewards and ``answer_accuracy`` see which mode an answer chose, as
    the authors' reward reads it from the decoded response."""
    tokenizer.add_tokens(list(CONTROL_TOKENS), special_tokens=False)
    return tokenizer


def conversation(question: str, answer: int, style: str = "plain") -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": response(question, answer, style)}]


def examples(count: int, split: str, *, seed: int, max_digits: int, exclude: frozenset = frozenset(),
             style: str = "plain") -> list[dict]:
    """``count`` examples of ``split``, each a dict with ``id``, ``question``, ``answer``, ``messages`` (chosen) and
    ``rejected``.  Questions in ``exclude`` (and repeats) are skipped and more are drawn, up to ``20 * count``
    draws, so a small question space can give fewer.  ``style: thinkless`` gives each question twice, with the
    reasoning answer and with the short one (:func:`thinkless_responses`), in that order."""
    out: list[dict] = []
    seen = set(exclude)
    for i in range(20 * count):
        if len(out) == count:
            break
        question, answer, wrong = problem(seed, split, i, max_digits)
        if question in seen:
            continue
        if exclude:  # held-out questions are distinct; training data keeps its natural repeats
            seen.add(question)
        if style == "thinkless":  # the pair: the reasoning answer and the short one, as two examples
            for mode, text, wrong_text in zip(("think", "short"), thinkless_responses(question, answer),
                                              thinkless_responses(question, wrong)):
                if len(out) < count:
                    out.append({"id": f"{DOMAIN}-{split}-{i:06d}-{mode}", "question": question, "answer": answer,
                                "messages": _conversation_with(question, text),
                                "rejected": _conversation_with(question, wrong_text)})
            continue
        own = (random.Random(f"{seed}:{split}:{i}:style").choice(MIXED_STYLES) if style == "plain_or_sentence"
               else style)
        out.append({"id": f"{DOMAIN}-{split}-{i:06d}", "question": question, "answer": answer,
                    "messages": conversation(question, answer, own),
                    "rejected": conversation(question, wrong, own)})
    return out


def _conversation_with(question: str, text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": text}]


def splits(train: int, eval_: int, *, seed: int = 0, max_digits: int = 2,
           style: str = "plain") -> tuple[list[dict], list[dict]]:
    """The train and eval examples, eval questions disjoint from train questions."""
    train_examples = examples(train, "train", seed=seed, max_digits=max_digits, style=style)
    seen = frozenset(e["question"] for e in train_examples)
    return train_examples, examples(eval_, "eval", seed=seed, max_digits=max_digits, exclude=seen, style=style)
