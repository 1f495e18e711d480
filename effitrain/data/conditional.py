"""Conditional training (Korbak et al. 2023, "Pretraining Language Models with Human Preferences", 2302.08582):
every segment of a training document is preceded by a control token, ``<|good|>`` when a scorer rates it good and
``<|bad|>`` otherwise; at generation time the model is conditioned on ``<|good|>``.

As the authors' ``apo/dataset_wrappers.py`` (tomekkorbak/pretraining-with-human-feedback) does it:

* documents are split into segments (sentences with their trailing whitespace, the spaCy sentencizer's
  ``text_with_ws``, for their toxicity and PII tasks; lines for PEP8) and each segment is scored on its own;
* a segment is good when its score is at most the threshold (their scores are misalignment scores: lower is better);
* with probability ``drop_token_fraction`` a segment gets no token (their 0.01; 0.1 for PEP8), so the model also
  learns the unconditional distribution;
* the control token is plain text before the segment, tokenized to one added special token, and stays in the labels:
  their objective is the plain MLE over every token, so the model also learns to predict the tokens;
* the document separator (EOS) comes before the first segment's token, as packing places one EOS between documents.

Here the rating comes from a registered selection scorer (``perplexity`` by default: a proxy's loss, so lower is
better, as theirs), and the threshold is either a fixed score (their configs) or the quantile that labels a chosen
share of the segments bad.  Evaluation documents are not conditioned: eval loss is that of plain text.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import numpy as np

SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*\s+")


def split_segments(text: str, how: str) -> list[str]:
    """``text`` cut into its segments; ``"".join(segments) == text`` (whitespace stays with the segment before it)."""
    if how == "document" or not text:
        return [text] if text else []
    if how == "line":
        return text.splitlines(keepends=True)
    segments, start = [], 0
    for match in SENTENCE_END.finditer(text):
        segments.append(text[start:match.end()])
        start = match.end()
    if start < len(text):
        segments.append(text[start:])
    return segments


def threshold_for(scores: np.ndarray, good_when: str, bad_fraction: float) -> float:
    """The score that labels ``round(bad_fraction * N)`` of the ``N`` segments bad (the worst ones): with
    ``good_when=low`` a segment is good when its score is <= the threshold, so the threshold is the largest score
    among the ``N - round(f N)`` lowest (ties at the threshold are all good)."""
    n = len(scores)
    n_good = n - int(round(bad_fraction * n))
    ordered = np.sort(np.asarray(scores, dtype=np.float64))
    if good_when == "low":
        return float(ordered[n_good - 1]) if n_good > 0 else -np.inf
    return float(ordered[n - n_good]) if n_good > 0 else np.inf


def is_good(scores: np.ndarray, threshold: float, good_when: str) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    return scores <= threshold if good_when == "low" else scores >= threshold


def add_control_tokens(tokenizer: Any, params: Any) -> Any:
    """The two control tokens added as special tokens: each encodes to one new id, never split or merged with the
    text around it, and ``decode(skip_special_tokens=True)`` drops it (as the authors strip them from samples)."""
    tokenizer.add_tokens([params.good_token, params.bad_token], special_tokens=True)
    return tokenizer


def conditioned_texts(texts: list[str], params: Any, scores_of: Any) -> tuple[list[str], dict[str, Any]]:
    """``texts`` with a control token before every segment, and what was done (counts, threshold).

    ``scores_of(segments) -> np.ndarray`` rates the segments (all documents' at once, in order)."""
    pieces = [split_segments(text, params.segment) for text in texts]
    flat = [segment for doc in pieces for segment in doc]
    scores = np.asarray(scores_of(flat), dtype=np.float64)
    threshold = params.threshold if params.threshold is not None else \
        threshold_for(scores, params.good_when, params.bad_fraction)
    good = is_good(scores, threshold, params.good_when)
    keep = np.random.default_rng([params.seed, 2302_08582]).random(len(flat)) >= params.drop_token_fraction
    out, i = [], 0
    for doc in pieces:
        parts = []
        for segment in doc:
            token = (params.good_token if good[i] else params.bad_token) if keep[i] else ""
            parts.append(token + segment)
            i += 1
        out.append("".join(parts))
    info = {"segments": len(flat), "good": int((good & keep).sum()), "bad": int((~good & keep).sum()),
            "without_token": int((~keep).sum()), "threshold": float(threshold), "good_when": params.good_when}
    return out, info


def condition_documents(docs: Any, tokenizer: Any, params: Any,
                        scores_of: Callable[[list[str]], np.ndarray]) -> tuple[Any, Any, dict[str, Any]]:
    """``(tokenizer with the control tokens, docs whose text carries them, info)`` for a ``datasets.Dataset`` of
    training documents; ``scores_of`` rates the segments (the run's ``params.scorer``, which the caller builds:
    :func:`effitrain.data.splits.build_packed_splits` passes a selection scorer, cached by the segments' text)."""
    texts, info = conditioned_texts(list(docs["text"]), params, scores_of)
    conditioned = docs.remove_columns("text").add_column("text", texts)
    return add_control_tokens(tokenizer, params), conditioned, info
