"""Rollouts: what a synthesis stage does with one document (the ``rollout`` registry group).

A rollout cuts a document into pieces, makes the prompts of a piece (its fan-out: one request per variant),
parses an answer into a training text, and decides whether to keep it (the post-filter).  The stage
(:mod:`effitrain.generation.synthesis`) owns the rest: batching, the cache, the chunks, the output dataset.

The contract (:class:`Rollout` gives the defaults):

* ``pieces(text) -> [str]``: what one document is cut into;
* ``prompts(piece) -> [Ask | (variant, prompt)]``: the first round of requests of a piece;
* ``rows(piece, ask, completions) -> [(sample, text)]``: the training texts one answered request gives (by default
  each completion through ``parse`` and the post-filter ``keep``); ``sample`` indexes ``completions``;
* ``follow_up(piece, answered) -> [Ask]``: the next round's requests from this round's answers (``answered``:
  ``[(ask, completions)]``), empty when the piece is done.  A rollout of several steps (EntiGraph: entities, then
  the relations between them) is rounds of requests; every round's answers are cached like the first's, so a
  resumed stage re-derives the same next round from the cache and sends nothing twice;
* ``planned_follow_ups(piece) -> int``: at most how many follow-up requests a piece makes (``effitrain plan``);
* ``bind(documents)``: called once with all of the stage's input documents (``{id, text, domain}``) before any
  piece is made, for a rollout whose prompts draw on other documents (few-shot demonstrations of a class).

``wrap``: Web Rephrase Augmented Pre-training (Maini et al., 2024, arXiv 2401.16380).  The four style prompts are
the paper's (its appendix), in the Vicuna chat layout the paper used with its instruction-tuned rephraser; each
document is cut into pieces of about 300 tokens at sentence ends first (the paper: "asking an LLM to rephrase more
than 300 tokens often led to a loss of information").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional


class Ask(NamedTuple):
    """One request of a rollout: ``variant`` names it within its piece (a style, 'entities', 'pair:0,3'), and
    ``attempt`` > 0 asks the same prompt again under another cache key and seed (a retry of an answer that did not
    parse: the first answer is cached, so the same key would give it back)."""
    variant: str
    prompt: str
    attempt: int = 0

    @property
    def label(self) -> str:
        """The variant in a row's id: an answer of a retry is told apart from the first try's."""
        return self.variant if not self.attempt else f"{self.variant}~{self.attempt}"


def as_ask(item: Any) -> Ask:
    return item if isinstance(item, Ask) else Ask(*item)


class Rollout:
    """The defaults of the contract: one round, each completion parsed and post-filtered on its own."""

    def parse(self, completion: str) -> Optional[str]:
        text = completion.strip()
        return text or None

    def keep(self, piece: str, text: str) -> bool:
        return True

    def rows(self, piece: str, ask: Ask, completions: tuple[str, ...]) -> list[tuple[int, str]]:
        out = []
        for j, completion in enumerate(completions):
            text = self.parse(completion)
            if text is not None and self.keep(piece, text):
                out.append((j, text))
        return out

    def follow_up(self, piece: str, answered: list[tuple[Ask, tuple[str, ...]]]) -> list[Ask]:
        return []

    def planned_follow_ups(self, piece: str) -> int:
        return 0

    def bind(self, documents: list[dict[str, str]]) -> None:
        pass

#: the paper's system preamble and per-style instructions (appendix of 2401.16380)
WRAP_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
               "detailed, and polite answers to the questions.")
WRAP_INSTRUCTIONS = {
    "easy": "For the following paragraph give me a paraphrase of the same using a very small vocabulary and "
            "extremely simple sentences that a toddler will understand:",
    "medium": "For the following paragraph give me a diverse paraphrase of the same in high quality English "
              "language as in sentences on Wikipedia:",
    "hard": "For the following paragraph give me a paraphrase of the same using very terse and abstruse language "
            "that only an erudite scholar will understand. Replace simple words and phrases with rare and complex "
            "ones:",
    "qa": "Convert the following paragraph into a conversational format with multiple tags of \"Question:\" "
          "followed by \"Answer:\":",
}

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
# an instruction-tuned rephraser often opens with "Sure! Here is a paraphrase ...:" -- the paper's post-processing
# (its appendix B) removes such leading segments; this is that rule for the openers seen in practice
_PREAMBLE = re.compile(r"^\s*(sure|certainly|of course|here)[^\n]{0,120}?(paraphrase|rephras|version|format|"
                       r"conversation)[^\n]*?:\s*", re.IGNORECASE)


def wrap_prompt(style: str, text: str) -> str:
    return f"{WRAP_SYSTEM} USER: {WRAP_INSTRUCTIONS[style]}\n{text.strip()}\nASSISTANT:"


def split_pieces(text: str, max_words: int) -> list[str]:
    """``text`` in pieces of at most ``max_words`` words, cut at sentence ends (a longer sentence alone is cut at
    ``max_words``)."""
    pieces: list[str] = []
    current: list[str] = []
    for sentence in _SENTENCE_END.split(" ".join(text.split())):
        words = sentence.split()
        while len(words) > max_words:  # one sentence longer than a piece: cut it
            if current:
                pieces.append(" ".join(current))
                current = []
            pieces.append(" ".join(words[:max_words]))
            words = words[max_words:]
        if current and len(current) + len(words) > max_words:
            pieces.append(" ".join(current))
            current = []
        current += words
    if current:
        pieces.append(" ".join(current))
    return pieces


@dataclass
class WrapRollout(Rollout):
    styles: list[str]
    max_words: int
    min_words: int
    name: str = "wrap"

    def pieces(self, text: str) -> list[str]:
        return split_pieces(text, self.max_words)

    def prompts(self, piece: str) -> list[tuple[str, str]]:
        return [(style, wrap_prompt(style, piece)) for style in self.styles]

    def parse(self, completion: str) -> Optional[str]:
        text = _PREAMBLE.sub("", completion, count=1).strip()
        return text or None

    def keep(self, piece: str, text: str) -> bool:
        return len(text.split()) >= self.min_words


def build_wrap(params: Any) -> WrapRollout:
    return WrapRollout(styles=list(params.styles), max_words=params.max_words, min_words=params.min_words)
