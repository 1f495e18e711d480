"""ITERTL's sampling step (Wu, Guo, Xiao, Li, Ye, Fan, 2024, arXiv 2407.12022): the model trained in the previous
round writes the training samples of the next one.

In the paper each round samples several answers per instruction from the previous round's model, ranks them by a
score against the reference (its RTL tools), and trains on them together with the reference samples, so that the
training data stays close to what the model itself produces (less distribution mismatch).  The demo corpus has
documents, not instructions, so a "task" here is a reference document's start: the model continues its first
``prompt_words`` words ``n`` times (the generator block's ``n``), each continuation is scored by its word-overlap F1
with the reference's own continuation, and the ``keep`` best (at least ``min_score``) become training texts --
start plus continuation, the whole document as the model wrote it.  The round's training stage mixes them with the
reference documents (``dataset.synthetic`` and the mixture curriculum); see docs/recipes/iterative_resampling.md.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from effitrain.generation.rollouts import Ask, Rollout, split_pieces

CONTINUE = "continue"


def overlap_f1(candidate: str, reference: str) -> float:
    """Word-overlap F1 (SQuAD's token F1, lower-cased, bag of words) of two texts; 0 when either is empty."""
    a, b = Counter(candidate.lower().split()), Counter(reference.lower().split())
    common = sum((a & b).values())
    if not common:
        return 0.0
    precision, recall = common / sum(a.values()), common / sum(b.values())
    return 2 * precision * recall / (precision + recall)


@dataclass
class ResampleRollout(Rollout):
    prompt_words: int
    max_words: int
    keep_best: int
    min_score: float
    name: str = "resample"

    def pieces(self, text: str) -> list[str]:
        # a piece shorter than its prompt leaves nothing to continue: it is no task
        return [p for p in split_pieces(text, self.max_words) if len(p.split()) > self.prompt_words]

    def split(self, piece: str) -> tuple[str, str]:
        words = piece.split()
        return " ".join(words[:self.prompt_words]), " ".join(words[self.prompt_words:])

    def prompts(self, piece: str) -> list[Ask]:
        return [Ask(CONTINUE, self.split(piece)[0])]

    def rows(self, piece: str, ask: Ask, completions: tuple[str, ...]) -> list[tuple[int, str]]:
        start, reference = self.split(piece)
        scored = [(overlap_f1(c, reference), j) for j, c in enumerate(completions) if c.strip()]
        # the best first; equal scores keep the order they were drawn in
        best = sorted((s for s in scored if s[0] >= self.min_score), key=lambda s: (-s[0], s[1]))[:self.keep_best]
        return [(j, f"{start} {completions[j].strip()}") for _, j in sorted(best, key=lambda s: s[1])]


def build_resample(params: Any) -> ResampleRollout:
    return ResampleRollout(prompt_words=params.prompt_words, max_words=params.max_words, keep_best=params.keep,
                           min_score=params.min_score)
