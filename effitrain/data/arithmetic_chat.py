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


ANSWER_STYLES = ("plain", "think_boxed", "sentence", "plain_or_sentence")
#: ``plain_or_sentence`` answers each example in one of these, drawn per example: a model fine-tuned on it answers
#: in either style at random, the unconditioned start that principle-following (``objective: sami``) works from
MIXED_STYLES = ("plain", "sentence")


def response(question: str, answer: int, style: str = "plain") -> str:
    """The assistant's text: ``plain`` is the number; ``sentence`` says it in a sentence ("The answer is 82.");
    ``think_boxed`` restates the sum in ``<think>`` tags and boxes
    the number, the response format of math RL data that the ``format`` and ``length`` rewards check."""
    if style == "plain":
        return str(answer)
    if style == "sentence":
        return f"The answer is {answer}."
    expression = question.removeprefix("What is ").removesuffix("?")
    return f"<think>{expression}</think> \\boxed{{{answer}}}"


def conversation(question: str, answer: int, style: str = "plain") -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": response(question, answer, style)}]


def examples(count: int, split: str, *, seed: int, max_digits: int, exclude: frozenset = frozenset(),
             style: str = "plain") -> list[dict]:
    """``count`` examples of ``split``, each a dict with ``id``, ``question``, ``answer``, ``messages`` (chosen) and
    ``rejected``.  Questions in ``exclude`` (and repeats) are skipped and more are drawn, up to ``20 * count``
    draws, so a small question space can give fewer."""
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
        own = (random.Random(f"{seed}:{split}:{i}:style").choice(MIXED_STYLES) if style == "plain_or_sentence"
               else style)
        out.append({"id": f"{DOMAIN}-{split}-{i:06d}", "question": question, "answer": answer,
                    "messages": conversation(question, answer, own),
                    "rejected": conversation(question, wrong, own)})
    return out


def splits(train: int, eval_: int, *, seed: int = 0, max_digits: int = 2,
           style: str = "plain") -> tuple[list[dict], list[dict]]:
    """The train and eval examples, eval questions disjoint from train questions."""
    train_examples = examples(train, "train", seed=seed, max_digits=max_digits, style=style)
    seen = frozenset(e["question"] for e in train_examples)
    return train_examples, examples(eval_, "eval", seed=seed, max_digits=max_digits, exclude=seen, style=style)
