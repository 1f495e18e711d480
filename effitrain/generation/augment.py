"""Few-shot data augmentation for parameter-efficient fine-tuning (Patwa, Filice, Chen, Castellucci, Rokhlenko,
Malmasi, "Enhancing Low-Resource LLMs Classification with PEFT and Synthetic Data", LREC-COLING 2024, arXiv
2404.02422): with a handful of labelled examples per class, one language model

1. **generates** new examples of each class from a few-shot prompt of that class's real examples,
2. **filters** them with in-context learning: the same model labels each new example from one real
   demonstration per class, and an example whose label is not the class it was written for is dropped,
3. and the model is then fine-tuned with LoRA on the real plus the kept synthetic examples (the recipe's last
   stage; docs/recipes/peft_augmentation.md).

Here a class is a document's domain (the demo corpus's prose, code, arithmetic) and an example a document cut to
``max_words`` words.  The rollout is two rounds per real example: ``per_example`` generation requests (each with
its own draw of ``shots - 1`` other examples of the class after the example itself, so the requests differ), then
one labelling request per parsed candidate (``filter: icl``).  A generation's answer is cut at the next ``Text:``
(the model going on to a further example) and kept only with ``min_words`` words; a label is the first word of the
labelling answer when it is a class name.  ``unparsed`` decides about an answer that names no class: ``drop`` (the
paper keeps only examples labelled as intended) or ``keep`` (a generator too weak to follow the format, the CPU
demo's, only loses the examples it contradicts).
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

from effitrain.generation.rollouts import Ask, Rollout

GENERATE, CHECK = "generate", "check"
_SEPARATOR = "Text:"


def cut_words(text: str, max_words: int) -> str:
    return " ".join(text.split()[:max_words])


def generation_prompt(label: str, demonstrations: list[str]) -> str:
    """The class's examples, then an open ``Text:`` for a new one (the paper's class-conditional few-shot prompt)."""
    shown = "".join(f"{_SEPARATOR} {d}\n\n" for d in demonstrations)
    return f"The following are texts of the category \"{label}\".\n\n{shown}{_SEPARATOR}"


def labelling_prompt(labels: list[str], demonstrations: list[tuple[str, str]], candidate: str) -> str:
    """One demonstration per class with its label, then the candidate: the in-context classifier of the filter."""
    shown = "".join(f"{_SEPARATOR} {text}\nCategory: {label}\n\n" for label, text in demonstrations)
    return (f"Classify each text into one of the categories: {', '.join(labels)}.\n\n{shown}{_SEPARATOR} "
            f"{candidate}\nCategory:")


def parse_candidate(completion: str, max_words: int, min_words: int) -> Optional[str]:
    """The new example of a generation answer: up to the next ``Text:``, at most ``max_words`` words."""
    text = cut_words(completion.split(_SEPARATOR, 1)[0], max_words)
    return text if len(text.split()) >= max(min_words, 1) else None


def parse_label(completion: str, labels: list[str]) -> Optional[str]:
    """The class a labelling answer names: its first word, lower-cased and without punctuation, if it is one."""
    words = completion.strip().split()
    if not words:
        return None
    first = words[0].strip(".,;:!?\"'()[]").lower()
    return next((label for label in labels if label.lower() == first), None)


@dataclass
class FewShotAugment(Rollout):
    per_example: int
    shots: int
    max_words: int
    min_words: int
    filter: str
    unparsed: str
    seed: int
    name: str = "few_shot_augment"
    # bound to the stage's input documents (bind): the classes' examples, and each piece's class
    examples: dict[str, list[str]] = field(default_factory=dict)
    class_of: dict[str, str] = field(default_factory=dict)
    # a labelling request's candidate and its intended class, by (piece, variant): follow_up writes, rows reads
    candidates: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)

    def bind(self, documents: list[dict[str, str]]) -> None:
        self.examples, self.class_of = {}, {}
        for doc in documents:
            piece = cut_words(doc["text"], self.max_words)
            if piece and piece not in self.class_of:
                self.examples.setdefault(doc["domain"], []).append(piece)
                self.class_of[piece] = doc["domain"]

    @property
    def labels(self) -> list[str]:
        return sorted(self.examples)

    def _rng(self, *parts: Any) -> random.Random:
        digest = hashlib.sha256(repr((self.seed, *parts)).encode()).hexdigest()
        return random.Random(int(digest[:16], 16))

    def pieces(self, text: str) -> list[str]:
        piece = cut_words(text, self.max_words)
        return [piece] if piece in self.class_of else []

    def prompts(self, piece: str) -> list[Ask]:
        label = self.class_of[piece]
        others = [e for e in self.examples[label] if e != piece]
        asks, seen = [], Counter()
        for i in range(self.per_example):
            drawn = self._rng(GENERATE, piece, i).sample(others, min(self.shots - 1, len(others)))
            prompt = generation_prompt(label, [piece, *drawn])
            # a draw that repeats an earlier one (few examples) is asked again under its own key and seed, so
            # every request of the example is a new sample, not the cached answer of the first
            asks.append(Ask(f"{GENERATE}{i}", prompt, seen[prompt]))
            seen[prompt] += 1
        return asks

    def rows(self, piece: str, ask: Ask, completions: tuple[str, ...]) -> list[tuple[int, str]]:
        if ask.variant.startswith(GENERATE):
            if self.filter == "icl":
                return []  # a candidate becomes a row once its label is checked (the next round)
            found = [(j, parse_candidate(c, self.max_words, self.min_words)) for j, c in enumerate(completions)]
            return [(j, text) for j, text in found if text is not None]
        candidate, label = self.candidates[(piece, ask.variant)]
        votes = Counter(v for v in (parse_label(c, self.labels) for c in completions) if v is not None)
        predicted = votes.most_common(1)[0][0] if votes else None
        if predicted == label or (predicted is None and self.unparsed == "keep"):
            return [(0, candidate)]
        return []

    def follow_up(self, piece: str, answered: list[tuple[Ask, tuple[str, ...]]]) -> list[Ask]:
        if self.filter != "icl":
            return []
        label = self.class_of[piece]
        asks = []
        for ask, completions in answered:
            if not ask.variant.startswith(GENERATE):
                continue  # the labels are the last round
            for j, completion in enumerate(completions):
                candidate = parse_candidate(completion, self.max_words, self.min_words)
                if candidate is None:
                    continue
                variant = f"{CHECK}:{ask.label}.{j}"
                self.candidates[(piece, variant)] = (candidate, label)
                asks.append(Ask(variant, labelling_prompt(self.labels, self.demonstrations(piece, variant),
                                                          candidate)))
        return asks

    def demonstrations(self, piece: str, variant: str) -> list[tuple[str, str]]:
        """One real example per class, drawn per labelling request, in a drawn order (no class always last)."""
        rng = self._rng(CHECK, piece, variant)
        shown = [(label, rng.choice(self.examples[label])) for label in self.labels]
        rng.shuffle(shown)
        return shown

    def planned_follow_ups(self, piece: str) -> int:
        return self.per_example if self.filter == "icl" else 0  # one label per generation (the generator's n is 1)


def build_few_shot_augment(params: Any) -> FewShotAugment:
    return FewShotAugment(per_example=params.per_example, shots=params.shots, max_words=params.max_words,
                          min_words=params.min_words, filter=params.filter, unparsed=params.unparsed,
                          seed=params.seed)
