"""StructTuning (Liu, Chen, Fu, Jiang, Zhou, Chen, Wu, Ye, 2024, "Structure-aware Domain Knowledge Injection for
Large Language Models", arXiv 2407.16724): teach a model a corpus the way a textbook does, knowledge points placed
in the structure they belong to.

The authors' pipeline (github.com/alibaba/struxgpt, ``examples/StructTuning/LongBench/preprocess.py`` and
``src/models/struxgpt_v2.py``):

1. every passage is cut into chunks at paragraph ends; each chunk gets a *scope* (a short title) -- from their
   fine-tuned structuriser StruXGPT, or, when its answer does not parse, from a generator asked to summarise the
   chunk in at most eight words;
2. the passage's own title is the generator's eight-word summary of its chunks' titles, and the passage's
   knowledge structure (a *mindmap*) is that title over its chunks' titles, drawn as a tree;
3. **SCPT** (structure-aware continued pre-training): each chunk is trained on after the mindmap with the chunk's
   own branch marked (``**title**``) and a sentence naming field and branch; each passage's mindmap is also a
   training text of its own;
4. **SSFT** (structure-aware supervised fine-tuning): the generator writes an exam question, a short answer and an
   explanation from the mindmap and one or two of its chunks (marked in the mindmap); the fine-tuning answer
   recites the knowledge structure, then the explanation, then the answer; "what is the knowledge structure of
   <field>?" with the mindmap as the answer is an example too.

Here a passage is a document of the stage's input, its chunks pieces of ``chunk_words`` words cut at sentence ends,
and the rollout runs the rounds of the stage (:mod:`effitrain.generation.rollouts`): round 1 asks each chunk's
title, round 2 the passage's title (every chunk of a passage asks the same prompt, so the stage sends it once), and
in ``product: qa`` round 3 the questions.  ``product: corpus`` makes the SCPT texts, ``product: qa`` the SSFT texts;
two synthesis stages with the same generator share rounds 1 and 2 through the request cache, so the second sends
only its questions.  The chunk titles use the authors' fallback path (the summary) for every chunk: StruXGPT's
per-chunk aspects (a third level of the tree) need that fine-tuned 7B model.  The prompts follow the authors' in
what they ask; the wording is this module's.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

from effitrain.generation.rollouts import Ask, Rollout, split_pieces

TITLE, FIELD, MINDMAP, QUESTION = "title", "field", "mindmap", "qa"
MARK = "**"

#: SCPT's framing of a chunk (the authors draw one of a pool of such templates per chunk; these are worded here)
CORPUS_TEMPLATES = (
    "In the field of `{field}`, the knowledge is organised as the following tree:\n\n{mindmap}\n\n"
    "Within `{field}`, the part `{aspect}` reads:\n\n",
    "The structure of `{field}` is outlined below, one branch per topic:\n\n{mindmap}\n\n"
    "The branch `{aspect}` of `{field}` covers the following:\n\n",
    "`{field}` is made of the topics in this outline:\n\n{mindmap}\n\n"
    "Looking closer at `{aspect}`, one part of `{field}`:\n\n",
)

_OPENER = re.compile(r"^\s*(sure|certainly|of course|here)\b[^\n:]*:\s*", re.IGNORECASE)
_QUOTED = re.compile(r"[\"`\[]([^\"`\[\]]{2,})[\"`\]]")
_PUNCT = re.compile(r"[^\w\s'-]")


def summary_prompt(content: str, words: int) -> str:
    """The generator's title of a chunk (or of a passage, from its chunks' titles): at most ``words`` words."""
    return (f"Summarize the following content in at most {words} words.\n\nContent:\n{content.strip()}\n\n"
            f"Write the summary only, on one line.\nSummary:")


def parse_title(completion: str, words: int) -> Optional[str]:
    """The title in a summary answer: its first non-empty line, without an opener ("Sure, here is ...:"), the
    quoted part if it quotes one, no punctuation, at most ``words`` words (the authors' scope parsing)."""
    for line in completion.splitlines():
        line = _OPENER.sub("", line).strip()
        if not line:
            continue
        quoted = _QUOTED.search(line)
        line = quoted.group(1) if quoted else line
        title = " ".join(_PUNCT.sub(" ", line).split()[:words])
        return title if re.search(r"[^\W_]", title) else None  # "-" or "'" alone names nothing
    return None


def draw_mindmap(root: str, branches: list[str], marked: frozenset[int] = frozenset()) -> str:
    """``root`` over its ``branches`` as a tree (the authors' box-drawing layout); the branches whose index is in
    ``marked`` are written ``**title**``."""
    lines = [root]
    for i, name in enumerate(branches):
        shown = f"{MARK}{name}{MARK}" if i in marked else name
        lines.append(("└─ " if i == len(branches) - 1 else "├─ ") + shown)
    return "\n".join(lines)


def question_prompt(mindmap: str, sections: list[str]) -> str:
    """SSFT's exam-question request: the mindmap with the chosen branches marked, their texts, the format."""
    shown = "\n\n".join(sections)
    hops = ("a question that needs the marked sections together (several steps of reasoning along the structure)"
            if len(sections) > 1 else "a question about a precise detail of the marked section")
    return (f"You write a closed-book exam question about a body of knowledge. Its structure, with the sections "
            f"the question is about marked **like this**:\n\n{mindmap}\n\nThe text of the marked section(s):\n\n"
            f"{shown}\n\nWrite {hops}. The answer is at most 8 words taken from the text; the explanation derives "
            f"it step by step without mentioning the text or the structure. Use this format:\n"
            f"# Question\n...\n# Answer\n...\n# Explanation\n...\n\n# Question\n")


_PART = re.compile(r"^\s*#\s*(question|answer|explanation)\s*$", re.IGNORECASE | re.MULTILINE)


def parse_question(completion: str) -> Optional[tuple[str, str, str]]:
    """(question, answer, explanation) of an answer to :func:`question_prompt` (the prompt opens the question's
    part, so the answer starts inside it); None when the answer or the question is missing."""
    parts = _PART.split("# Question\n" + completion)
    found: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2]):
        found.setdefault(name.lower(), body.strip())
    question, answer = found.get("question", ""), found.get("answer", "")
    if not question or not answer:
        return None
    return question, answer, found.get("explanation", "")


class Section(str):
    """A chunk of a passage: its text, with the passage it belongs to (``passage``: a digest of the passage's
    text) and its place in it, which the rollout's later rounds need."""

    passage: str
    index: int
    count: int

    def __new__(cls, text: str, passage: str, index: int, count: int) -> "Section":
        made = super().__new__(cls, text)
        made.passage, made.index, made.count = passage, index, count
        return made


@dataclass
class StructTuningRollout(Rollout):
    product: str
    chunk_words: int
    title_words: int
    questions: int
    max_sections: int
    seed: int
    name: str = "struct_tuning"
    # filled as the rounds are answered: every section's title (rows of round 1), every passage's (round 2)
    titles: dict[tuple[str, int], str] = field(default_factory=dict)
    fields: dict[str, str] = field(default_factory=dict)
    # the sections' texts by passage (bind): a question shows sections other than the one that asks it
    section_texts: dict[tuple[str, int], str] = field(default_factory=dict)

    def _rng(self, *parts: Any) -> random.Random:
        digest = hashlib.sha256(repr((self.seed, *parts)).encode()).hexdigest()
        return random.Random(int(digest[:16], 16))

    def pieces(self, text: str) -> list[Section]:
        chunks = split_pieces(text, self.chunk_words)
        passage = hashlib.sha256(text.encode()).hexdigest()[:16]
        return [Section(c, passage, i, len(chunks)) for i, c in enumerate(chunks)]

    def prompts(self, piece: Section) -> list[Ask]:
        return [Ask(TITLE, summary_prompt(piece, self.title_words))]

    # ------------------------------------------------------------------------------------------------ the tree
    def branches(self, piece: Section) -> list[str]:
        return [self.titles[(piece.passage, i)] for i in range(piece.count)]

    def mindmap(self, piece: Section, marked: frozenset[int] = frozenset()) -> str:
        return draw_mindmap(self.fields[piece.passage], self.branches(piece), marked)

    def _field_prompt(self, piece: Section) -> str:
        return summary_prompt(". ".join(self.branches(piece)), self.title_words)

    # ---------------------------------------------------------------------------------------------- the rounds
    def rows(self, piece: Section, ask: Ask, completions: tuple[str, ...]) -> list[tuple[int, str]]:
        if ask.variant == TITLE:
            # a title that does not parse is the section's first words (the authors' generator always answered)
            self.titles[(piece.passage, piece.index)] = (parse_title(completions[0], self.title_words)
                                                         or " ".join(piece.split()[:self.title_words]))
            return []
        if ask.variant in (FIELD, MINDMAP):
            self.fields[piece.passage] = (parse_title(completions[0], self.title_words)
                                          or self.titles[(piece.passage, 0)])
            field_ = self.fields[piece.passage]
            if ask.variant == MINDMAP:
                if self.product == "qa":  # SSFT's structure question, answered by the mindmap
                    return [(0, f"Question: What is the knowledge structure of {field_}?\nAnswer: "
                                f"{self.mindmap(piece)}")]
                head = CORPUS_TEMPLATES[self._rng(MINDMAP, piece.passage).randrange(len(CORPUS_TEMPLATES))]
                return [(0, head.split("\n\n")[0].format(field=field_) + "\n\n" + self.mindmap(piece))]
            if self.product == "corpus":  # SCPT: the section after the tree with its own branch marked
                title = self.titles[(piece.passage, piece.index)]
                head = CORPUS_TEMPLATES[self._rng(FIELD, piece.passage, piece.index).randrange(len(CORPUS_TEMPLATES))]
                return [(0, head.format(field=field_, aspect=title,
                                        mindmap=self.mindmap(piece, frozenset({piece.index}))) + piece)]
            return []
        parsed = parse_question(completions[0])  # a question of round 3
        if parsed is None:
            return []  # the authors keep only answers in the format
        question, answer, explanation = parsed
        field_ = self.fields[piece.passage]
        # SSFT's answer: the knowledge structure first, then the reasoning, then the short answer
        reasoning = f"Here is the knowledge structure of {field_}:\n{self.mindmap(piece)}\n\n{explanation}".rstrip()
        return [(0, f"Question: Regarding {field_}, {question}\nAnswer: {reasoning}\nSo the answer is: {answer}")]

    def chosen_sections(self, piece: Section, k: int) -> list[int]:
        """The sections question ``k`` of a passage is about: 1 to ``max_sections`` of them, drawn with the seed,
        in their order (the authors: 1 or 2 chunks of a single passage)."""
        rng = self._rng(QUESTION, piece.passage, k)
        count = rng.randint(1, min(self.max_sections, piece.count))
        return sorted(rng.sample(range(piece.count), count))

    def follow_up(self, piece: Section, answered: list[tuple[Ask, tuple[str, ...]]]) -> list[Ask]:
        done = {ask.variant for ask, _ in answered}
        if TITLE in done:
            # every title of the passage is known once its round is answered: the passage's title is asked next.
            # In corpus mode every section asks it (the same prompt, so one request) to get its own SCPT row, and
            # the first section asks it once more as the passage's mindmap text.
            prompt = self._field_prompt(piece)
            if self.product == "corpus":
                return [Ask(FIELD, prompt)] + ([Ask(MINDMAP, prompt)] if piece.index == 0 else [])
            return [Ask(MINDMAP, prompt)] if piece.index == 0 else []
        if MINDMAP in done and self.product == "qa":
            asks, seen = [], Counter()
            for k in range(self.questions):
                chosen = self.chosen_sections(piece, k)
                sections = [self._section_text(piece, i) for i in chosen]
                prompt = question_prompt(self.mindmap(piece, frozenset(chosen)), sections)
                # a draw equal to an earlier one (a passage of few chunks) is asked again under its own key and
                # seed: every question of the passage is a new sample, not the first one's cached answer
                asks.append(Ask(f"{QUESTION}{k}", prompt, seen[prompt]))
                seen[prompt] += 1
            return asks
        return []

    def _section_text(self, piece: Section, index: int) -> str:
        return self.section_texts[(piece.passage, index)]

    def planned_follow_ups(self, piece: Section) -> int:
        # one passage-title request per passage (its sections ask the same prompt), and the questions
        if piece.index:
            return 0
        return 1 + (self.questions if self.product == "qa" else 0)

    def bind(self, documents: list[dict[str, str]]) -> None:
        self.section_texts = {}
        for doc in documents:
            for section in self.pieces(doc["text"]):
                self.section_texts[(section.passage, section.index)] = str(section)


def build_struct_tuning(params: Any) -> StructTuningRollout:
    return StructTuningRollout(product=params.product, chunk_words=params.chunk_words,
                               title_words=params.title_words, questions=params.questions,
                               max_sections=params.max_sections, seed=params.seed)
