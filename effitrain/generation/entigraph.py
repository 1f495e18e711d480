"""EntiGraph (Yang, Band, Li, Candès, Hashimoto, 2024, arXiv 2409.07431): synthetic continued pre-training.

A small corpus teaches little by itself: a model needs a fact stated many ways.  EntiGraph rewrites each document
as a graph walk over its entities: (1) the generator lists the document's entities (and summarises it), as JSON;
(2) for pairs and triples of those entities, it writes how they relate in the document.  The texts of step 2 (and
the summaries) are the synthetic corpus a model then continues pre-training on.  Authors' code:
github.com/ZitongYang/Synthetic_Continued_Pretraining (``data/entigraph.py``: entities, then every pair, then the
triples shuffled; ``utils/prompt_utils.py``: the system prompts).

Here it is a two-round rollout (:mod:`effitrain.generation.rollouts`): round one asks for the entities of a piece;
``follow_up`` parses the answer (a retry under a new seed when it holds no list, as the authors' loop retries) and
asks round two: ``singles`` / ``pairs`` / ``triples`` subsets drawn with a seed from the piece's text, so a
resumed stage asks the very same requests.  The prompts follow the paper's (its appendix; the authors' system
prompts) in their structure and instructions, worded here; the system and user messages are laid out as one
completion prompt (the generator speaks ``/completions``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional

from effitrain.generation.rollouts import Ask, Rollout, split_pieces

ENTITIES = "entities"
KINDS = {1: "entity", 2: "pair", 3: "triple"}

SYSTEM_ENTITIES = (
    "You analyse an article the user gives you. First, summarise the whole article briefly, keeping its main points "
    "and themes. Second, list every significant entity the article mentions: people (by the names or references "
    "used), places (concrete or abstract), objects, and the concepts central to its discussion. List as many as "
    "you can. Answer in JSON only, in this format:\n"
    '{"summary": "<a concise summary of the article>", "entities": ["entity1", "entity2", ...]}')

SYSTEM_RELATIONS = {
    1: ("You are an examiner writing reading-comprehension material about an article and one entity it mentions. "
        "Write open, thought-provoking questions that centre on the entity and ask for critical analysis of its "
        "role in the article, each followed by a detailed answer that refers to the article's content. Format:\n"
        "### Questions and answers about <entity>\nQuestion: ...\nAnswer: ...\n"),
    2: ("You analyse an article the user gives you, with two entities it mentions. Rephrase the article's content "
        "twice, once centred on the first entity and once on the second; then discuss how the two entities interact "
        "in the article; then write open questions about the two entities, each with a detailed answer. Keep each "
        "section clearly separated and give each enough context to stand alone. Format:\n"
        "### Discussion in relation to <entity1>\n...\n### Discussion in relation to <entity2>\n...\n"
        "### Interaction between <entity1> and <entity2>\n...\n### Questions and answers\nQuestion: ...\nAnswer: ...\n"),
    3: ("You analyse an article the user gives you, with three entities it mentions. Rephrase the article's content "
        "three times, centred on each entity in turn; then discuss how the three entities interact in the article; "
        "then write questions that involve all three entities and their interactions, each with its answer. Keep "
        "each section clearly separated and give each enough context to stand alone. Format:\n"
        "### Discussion in relation to <entity1>\n...\n### Discussion in relation to <entity2>\n...\n"
        "### Discussion in relation to <entity3>\n...\n### Interaction between <entity1>, <entity2> and <entity3>\n"
        "...\n### Questions involving <entity1>, <entity2> and <entity3>\n...\n"),
}

# common English words that are never an article's entity (the `terms` fallback ranks the others by frequency)
_STOPWORDS = frozenset("""
a about above after again against all also an and any are as at be because been before being below between both but
by can could did do does doing down during each few for from further had has have having he her here hers him his
how if in into is it its itself just may might more most must no nor not now of off on once one only or other our
out over own same she should so some such than that the their them then there these they this those through to too
under until up use used using very was we were what when where which while who whom why will with would you your
""".split())
_WORD = re.compile(r"[A-Za-z][A-Za-z0-9_'-]{3,}")


def layout(system: str, user: str) -> str:
    """A system and a user message as one completion prompt (the turn markers WRAP's prompts use too)."""
    return f"{system.strip()}\n\nUSER:\n{user.strip()}\nASSISTANT:"


def entities_prompt(piece: str) -> str:
    return layout(SYSTEM_ENTITIES, f"### Document Content:\n{piece}")


def relation_prompt(piece: str, entities: list[str]) -> str:
    listed = "".join(f"- {e}\n" for e in entities)
    return layout(SYSTEM_RELATIONS[len(entities)], f"### Document Content:\n{piece}\n### Entities:\n{listed}")


def parse_entities(completion: str, max_entities: int) -> Optional[tuple[Optional[str], list[str]]]:
    """(summary, entities) of an entity answer: the JSON object in it (code fences and words around it allowed)
    with an ``entities`` list of strings; None when there is none.  Entities are stripped, de-duplicated
    (case-insensitively, the first spelling kept) and cut to ``max_entities``."""
    start, end = completion.find("{"), completion.rfind("}")
    if start < 0 or end <= start:
        return None
    try:
        answer = json.loads(completion[start:end + 1])
    except ValueError:
        return None
    listed = answer.get("entities") if isinstance(answer, dict) else None
    if not isinstance(listed, list):
        return None
    entities, seen = [], set()
    for e in listed:
        if isinstance(e, str) and e.strip() and e.strip().lower() not in seen:
            seen.add(e.strip().lower())
            entities.append(e.strip())
    if not entities:
        return None
    summary = answer.get("summary")
    return (summary.strip() if isinstance(summary, str) and summary.strip() else None), entities[:max_entities]


def document_terms(piece: str, count: int) -> list[str]:
    """The ``fallback: terms`` stand-in for entities: the piece's most frequent words of four letters or more that
    are not common English words, the most frequent first (ties: the earlier first), as first spelled."""
    spelled: dict[str, str] = {}
    counts: Counter = Counter()
    for word in _WORD.findall(piece):
        key = word.lower().strip("'-")
        if key in _STOPWORDS or len(key) < 4:
            continue
        spelled.setdefault(key, word)
        counts[key] += 1
    order = {k: i for i, k in enumerate(spelled)}
    ranked = sorted(counts, key=lambda k: (-counts[k], order[k]))
    return [spelled[k] for k in ranked[:count]]


def draw_subsets(n_entities: int, size: int, count: Optional[int], rng: random.Random) -> list[tuple[int, ...]]:
    """Index subsets of ``size`` entities: all of them (``count`` None; triples shuffled, as the authors' code), or
    ``count`` drawn without replacement."""
    every = list(itertools.combinations(range(n_entities), size))
    if count is None:
        if size == 3:
            rng.shuffle(every)
        return every
    return rng.sample(every, min(count, len(every)))


@dataclass
class EntigraphRollout(Rollout):
    max_words: int
    max_entities: int
    counts: dict[int, Optional[int]]  # subset size -> how many per piece (None: all)
    seed: int
    entity_retries: int
    fallback: str
    summary_rows: bool
    min_words: int
    name: str = "entigraph"

    def pieces(self, text: str) -> list[str]:
        return split_pieces(text, self.max_words)

    def prompts(self, piece: str) -> list[Ask]:
        return [Ask(ENTITIES, entities_prompt(piece))]

    def rows(self, piece: str, ask: Ask, completions: tuple[str, ...]) -> list[tuple[int, str]]:
        if ask.variant == ENTITIES:  # the summary is a training text; the list itself is not
            if not self.summary_rows:
                return []
            out = []
            for j, completion in enumerate(completions):
                parsed = parse_entities(completion, self.max_entities)
                if parsed is not None and parsed[0] and len(parsed[0].split()) >= self.min_words:
                    out.append((j, parsed[0]))
            return out
        return [(j, c.strip()) for j, c in enumerate(completions) if len(c.split()) >= self.min_words]

    def follow_up(self, piece: str, answered: list[tuple[Ask, tuple[str, ...]]]) -> list[Ask]:
        asks: list[Ask] = []
        for ask, completions in answered:
            if ask.variant != ENTITIES:
                continue  # a relation text ends its branch
            parsed = next((p for p in (parse_entities(c, self.max_entities) for c in completions) if p), None)
            if parsed is not None:
                entities = parsed[1]
            elif ask.attempt < self.entity_retries:
                asks.append(Ask(ENTITIES, ask.prompt, ask.attempt + 1))
                continue
            elif self.fallback == "terms":
                entities = document_terms(piece, self.max_entities)
            else:
                continue
            asks += self.relation_asks(piece, entities)
        return asks

    def relation_asks(self, piece: str, entities: list[str]) -> list[Ask]:
        # seeded by the piece's text, not its position: the same piece draws the same subsets in any run or chunk
        digest = hashlib.sha256(f"{self.seed}:{piece}".encode()).hexdigest()
        rng = random.Random(int(digest[:16], 16))
        asks = []
        for size in (1, 2, 3):
            count = self.counts[size]
            if count == 0:
                continue
            for subset in draw_subsets(len(entities), size, count, rng):
                asks.append(Ask(f"{KINDS[size]}:{','.join(map(str, subset))}",
                                relation_prompt(piece, [entities[i] for i in subset])))
        return asks

    def planned_follow_ups(self, piece: str) -> int:
        most = self.entity_retries
        for size in (1, 2, 3):
            every = math.comb(self.max_entities, size)
            count = self.counts[size]
            most += every if count is None else min(count, every)
        return most


def build_entigraph(params: Any) -> EntigraphRollout:
    return EntigraphRollout(max_words=params.max_words, max_entities=params.max_entities,
                            counts={1: params.singles, 2: params.pairs, 3: params.triples}, seed=params.seed,
                            entity_retries=params.entity_retries, fallback=params.fallback,
                            summary_rows=params.summary_rows, min_words=params.min_words)
