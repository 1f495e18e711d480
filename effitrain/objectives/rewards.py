"""Verifiable reward functions for ``objective: grpo`` (and the reward statistics of ``methods.answer_accuracy``).

A reward block (``objective.rewards: [{name: ..., weight: ...}, ...]``, the ``reward`` registry group) builds a
function ``reward(responses, references, lengths) -> list[float]``: ``responses`` are the decoded completions (special
tokens dropped), ``references`` the dataset's reference answers (the assistant message of the conversation; a
reward that needs no ground truth ignores them), ``lengths`` the completions' lengths in tokens (EOS included).  The
objective sums the rewards with their weights, as TRL's ``reward_weights`` do.

Answer extraction (``extract``), shared by the rewards and by ``answer_accuracy``:

* ``full``: the whole response, stripped of surrounding white space (the built-in arithmetic answers: "82");
* ``boxed``: the content of the last ``\\boxed{...}`` (braces balanced), the convention of math RL data (MATH,
  DeepScaleR) and of the format reward below; None when there is none;
* ``last_number``: the last integer or decimal in the text (GSM8K-style answers); None when there is none.

``exact_answer`` (Tülu 3's RLVR reward, 2411.15124 section 6; DeepSeekMath's rule-based accuracy reward,
2402.03300): ``correct`` when the response's extracted answer equals the reference's, 0 otherwise (also when no
answer can be extracted: a malformed response earns nothing).  Numbers compare as numbers ("82.0" = "82").

``format`` and ``length`` are the surrogate rewards of Xin et al., "Surrogate Signals from Format and Length"
(2505.19439), as their released reward code (insightLLM/rl-without-gt, ``src/rewards/math_reward.py``) computes them:

* format = the mean of its checks: ``think`` (the response contains ``<think>...</think>``) and ``answer`` (a
  ``\\boxed{}`` answer can be extracted and is a well-formed number or arithmetic expression; the authors parse it
  with sympy, here a number/expression pattern); their "format-only" score is ``0.5 * think + 0.5 * answer``.
  ``zero_without_answer`` makes it 0 when the answer check fails, as their format-length score does;
* length, with ``x = tokens / max_tokens`` and ``p = peak``: ``1 - (1 - x/p)^2`` for ``x <= p`` (rising to 1 at p),
  ``1 - 2 ((x - p) / (1 - p))^2`` above (falling to -1 at ``x = 1``); ``gated``: a response without a well-formed
  answer gets ``min(0, length)`` (their format-length score is ``format + length`` with an answer, ``min(0,
  length)`` without).  Their setting: ``max_tokens`` 3072, ``peak`` 0.5.

``thinkless`` (Fang et al., "Thinkless: LLM Learns When to Think", 2505.13379; the authors' released reward,
VainF/Thinkless ``deepscaler/rewards/math_reward.py``): the answer is read after ``</think>`` when the response holds
``<think>`` and ``</think>``, else after ``<short>``; no such delimiter, or no ``\\boxed{}`` answer there, is a format
error.  A right answer earns ``correct_short`` (1.0) in short mode and ``correct_think`` (0.5) in thinking mode
(short is preferred when both are right); a wrong one ``wrong_short`` / ``wrong_think`` (-1.0 each); a format error
``format_error`` (-1.0).  The mode is ``<short>`` if the response holds it, else ``<think>``, as the authors test it.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Optional, Sequence

RewardFn = Callable[[Sequence[str], Sequence[str], Sequence[int]], list[float]]

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_EXPRESSION = re.compile(r"^[\d\s+\-*/^().,]*\d[\d\s+\-*/^().,]*$")
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)
_BOXED = "\\boxed{"


def last_boxed(text: str) -> Optional[str]:
    """The content of the last ``\\boxed{...}`` with balanced braces, or None."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth, i = 1, start + len(_BOXED)
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
    return None  # never closed: malformed


def last_number(text: str) -> Optional[str]:
    found = _NUMBER.findall(text.replace(",", ""))
    return found[-1] if found else None


EXTRACTORS: dict[str, Callable[[str], Optional[str]]] = {
    "full": lambda text: text.strip() or None,
    "boxed": last_boxed,
    "last_number": last_number,
}


def same_answer(a: Optional[str], b: Optional[str]) -> bool:
    """Equal answers: as numbers when both are numbers, else as stripped strings; None never matches."""
    if a is None or b is None:
        return False
    if _NUMBER.fullmatch(a) and _NUMBER.fullmatch(b):
        return float(a) == float(b)
    return a.strip() == b.strip()


def well_formed_answer(text: str) -> bool:
    """A ``\\boxed{}`` answer is present and is a number or an arithmetic expression (the authors: sympy-parsable)."""
    answer = last_boxed(text)
    return bool(answer) and bool(_EXPRESSION.match(answer))


def length_score(tokens: int, max_tokens: int, peak: float) -> float:
    """The authors' length curve (``length_reward_func_v3``): up to 1 at ``peak * max_tokens``, -1 at max_tokens."""
    x = tokens / max_tokens
    if x <= peak:
        return 1.0 - (1.0 - x / peak) ** 2
    return 1.0 - 2.0 * ((x - peak) / (1.0 - peak)) ** 2


def build_exact_answer(params: Any, **context: Any) -> RewardFn:
    extract = EXTRACTORS[params.extract]

    def exact_answer(responses: Sequence[str], references: Sequence[str], lengths: Sequence[int]) -> list[float]:
        return [params.correct if same_answer(extract(r), extract(ref)) else 0.0
                for r, ref in zip(responses, references)]
    return exact_answer


def build_format(params: Any, **context: Any) -> RewardFn:
    def format_reward(responses: Sequence[str], references: Sequence[str], lengths: Sequence[int]) -> list[float]:
        out = []
        for r in responses:
            answer_ok = well_formed_answer(r)
            checks = ([bool(_THINK.search(r))] if params.think else []) + ([answer_ok] if params.answer else [])
            score = sum(checks) / len(checks)
            out.append(0.0 if params.zero_without_answer and not answer_ok else score)
        return out
    return format_reward


def build_length(params: Any, **context: Any) -> RewardFn:
    def length_reward(responses: Sequence[str], references: Sequence[str], lengths: Sequence[int]) -> list[float]:
        out = []
        for r, n in zip(responses, lengths):
            y = length_score(n, params.max_tokens, params.peak)
            out.append(min(0.0, y) if params.gated and not well_formed_answer(r) else y)
        return out
    return length_reward


def thinkless_score(response: str, reference: Optional[str], params: Any) -> float:
    """One response's Thinkless reward (see the module's docstring) against the reference's answer."""
    from effitrain.data.arithmetic_chat import SHORT, THINK, THINK_END

    if THINK in response and THINK_END in response:
        solution = response.split(THINK_END, 1)[1]
    elif SHORT in response:
        solution = response.split(SHORT, 1)[1]
    else:
        return params.format_error
    answer = last_boxed(solution)
    if answer is None:
        return params.format_error
    short = SHORT in response
    if same_answer(answer, reference):
        return params.correct_short if short else params.correct_think
    return params.wrong_short if short else params.wrong_think


def build_thinkless(params: Any, **context: Any) -> RewardFn:
    def thinkless(responses: Sequence[str], references: Sequence[str], lengths: Sequence[int]) -> list[float]:
        # the reference: its boxed answer (the built-in pairs box theirs), else the whole text (a bare number)
        return [thinkless_score(r, last_boxed(ref) or ref.strip(), params) for r, ref in zip(responses, references)]
    return thinkless


def build_rewards(blocks: Sequence[Any]) -> list[tuple[str, float, RewardFn]]:
    """``[(name, weight, fn)]`` of validated reward blocks (``effitrain.registry.Block``)."""
    return [(block.name, block.params.weight, block.build()) for block in blocks]
