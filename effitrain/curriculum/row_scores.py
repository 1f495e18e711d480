"""A score for every packed training row, for curricula that order rows (difficulty, quality).

Two sources:

* ``scorer``: any registered selection scorer that needs no target (``perplexity``: a reference/proxy model's loss,
  the scorer of perplexity_filter; ``uniform``; ...) run on the rows' text, i.e. the row's tokens decoded with the
  run's tokenizer.  Rows are what the sampler orders, so they are what is scored (a packed row may join the end of
  one document and the start of the next; its score is the model's loss on exactly what training will see), all of
  it: unless the scorer's ``max_length`` is set (null or absent), it is raised to cover the longest row
  (:func:`whole_row_scorer`).  Scores
  are cached under ``$EFFITRAIN_CACHE/curriculum`` by a hash of the rows and the scorer's parameters; the pool proxy
  a scorer trains is cached there too.
* ``domain_order``: a declared order of the domains (first = lowest score); rows of one domain tie, and
  :func:`rank_difficulty` breaks ties by a seeded random order.

Shared by ``curriculum: difficulty`` and ``curriculum: scored_order``; reusable by any method that needs a per-row
score (pass the packed ids and the tokenizer).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Optional, Sequence

import numpy as np

from effitrain.registry import ConfigError, choices_text


def scorer_row_scores(scorer: dict[str, Any], rows: np.ndarray, tokenizer: Any, *, seed: int,
                      key: str = "curriculum.scorer") -> np.ndarray:
    """The scorer's score of each row of ``rows`` (``[N, L]`` token ids), in row order."""
    texts = tokenizer.batch_decode(rows.tolist(), skip_special_tokens=True)
    scorer = whole_row_scorer(scorer, texts, key)
    block = _target_free_scorer(scorer, key, "a curriculum")
    digest = hashlib.sha256(np.ascontiguousarray(rows).tobytes())
    return _cached_scores(block, scorer, digest, lambda: texts, len(rows), seed=seed, group="curriculum",
                          prefix="row-scores")


# a reference model's tokenizer may add a few special tokens (BOS, EOS, a word-start piece) to a row's bytes
SPECIAL_TOKEN_ALLOWANCE = 8


def whole_row_scorer(scorer: dict[str, Any], texts: Sequence[str], key: str) -> dict[str, Any]:
    """``scorer`` with ``max_length`` long enough for the longest row, unless the user set it (unset or null).

    A row is ranked for what training sees, all of it: the scorers' ``max_length`` default (128, counted in bytes by
    the byte-level pool proxy) would rank a demo row of about 400 bytes by its first 127.  A byte-level tokenizer
    never gives more tokens than bytes, so the longest row's byte count (plus a few special tokens) bounds every
    encoder's length; the batches are padded to their own longest row, not to this bound."""
    if scorer.get("max_length") is not None:
        return dict(scorer)
    return _covering(scorer, max((_utf8_len(text) for text in texts), default=0), key)


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _covering(scorer: dict[str, Any], longest: int, key: str) -> dict[str, Any]:
    """``scorer`` (without a user's ``max_length``) with ``max_length`` raised to cover ``longest`` bytes."""
    from effitrain.registry import REGISTRY

    if scorer.get("max_length") is not None:
        return dict(scorer)
    scorer = {k: v for k, v in scorer.items() if k != "max_length"}
    block = REGISTRY.parse("scorer", dict(scorer), key)
    if not hasattr(block.params, "max_length"):
        return scorer
    return {**scorer, "max_length": max(block.params.max_length, longest + SPECIAL_TOKEN_ALLOWANCE)}


_ROW_BLOCK = 4096  # rows decoded (and hashed) at a time from token shards


def sharded_row_scores(scorer: dict[str, Any], shards: Any, tokenizer: Any, *, seed: int,
                       key: str = "curriculum.scorer") -> np.ndarray:
    """:func:`scorer_row_scores` of token shards, without their texts in memory: the rows are hashed and decoded a
    block at a time into an Arrow file that ``datasets`` memory-maps, which the scorer reads in its own batches (its
    ``datasets.map``).  The texts, the scorer, its batches and the cache key are the in-memory path's, so the scores
    are too; what is held is 8 bytes a row (the scores)."""
    import datasets
    from datasets.arrow_writer import ArrowWriter

    from effitrain.paths import cache_dir

    _target_free_scorer(scorer, key, "a curriculum")
    rows = shards.rows
    n = len(rows)
    digest = hashlib.sha256()  # the in-memory digest: the int32 rows' bytes, row after row
    folder = cache_dir("curriculum")
    texts_path = folder / f".row-texts-{shards.folder.name}-{os.getpid()}.arrow"
    longest = 0
    writer = ArrowWriter(features=datasets.Features({"text": datasets.Value("string")}), path=str(texts_path))
    try:
        for lo in range(0, n, _ROW_BLOCK):
            block = np.ascontiguousarray(rows[lo:lo + _ROW_BLOCK], dtype=np.int32)
            digest.update(block.tobytes())
            texts = tokenizer.batch_decode(block.tolist(), skip_special_tokens=True)
            longest = max([longest, *map(_utf8_len, texts)])
            writer.write_batch({"text": texts})
        writer.finalize()
    finally:
        writer.close()
    full = _covering(scorer, longest, key)
    block = _target_free_scorer(full, key, "a curriculum")
    candidates = datasets.Dataset.from_file(str(texts_path))
    try:
        return _cached_scores(block, full, digest, lambda: candidates, n, seed=seed, group="curriculum",
                              prefix="row-scores")
    finally:
        candidates.cleanup_cache_files()  # the scorer's map outputs beside the texts
        texts_path.unlink(missing_ok=True)


def scorer_text_scores(scorer: dict[str, Any], texts: Sequence[str], *, seed: int, key: str, group: str,
                       what: str) -> np.ndarray:
    """The scorer's score of each text, in order (cached under ``$EFFITRAIN_CACHE/GROUP`` by the texts and the
    scorer's parameters); ``what`` names the user in the refusal of a scorer that needs target data."""
    block = _target_free_scorer(scorer, key, what)
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass") + b"\0")
    return _cached_scores(block, scorer, digest, lambda: list(texts), len(texts), seed=seed, group=group,
                          prefix="text-scores")


def _target_free_scorer(scorer: dict[str, Any], key: str, what: str) -> Any:
    from effitrain.registry import REGISTRY

    block = REGISTRY.parse("scorer", dict(scorer), key)
    if getattr(block.params, "NEEDS_TARGET", False):
        raise ConfigError(f"{key}.name: scorer '{block.name}' needs target data, which {what} does not declare; "
                          f"use a scorer without a target (e.g. perplexity)")
    return block


def _cached_scores(block: Any, scorer: dict[str, Any], digest: Any, texts: Any, count: int, *, seed: int,
                   group: str, prefix: str) -> np.ndarray:
    import datasets

    from effitrain.paths import cache_dir
    from effitrain.selection.base import Context

    digest.update(json.dumps({"scorer": scorer, "seed": seed, "version": getattr(block.params, "VERSION", 0)},
                             sort_keys=True, default=str).encode())
    key_hex = digest.hexdigest()[:20]
    folder = cache_dir(group)
    cached = folder / f"{prefix}-{key_hex}.npy"
    if cached.is_file():
        return np.load(cached)
    from effitrain.console import say

    say(f"{prefix}: scoring {count:,} rows with the {block.name} scorer (once; cached in {folder})")
    candidates = texts()
    if not isinstance(candidates, datasets.Dataset):  # a list of texts (a Dataset: token shards' texts on disk)
        candidates = datasets.Dataset.from_dict({"text": candidates})
    ctx = Context(target=None, seed=seed, work_dir=str(folder), candidates_hash=key_hex)
    scores = np.asarray(block.build().score(candidates, ctx).scores, dtype=np.float64)
    if scores.shape != (count,):
        raise RuntimeError(f"scorer {block.name} returned {scores.shape} scores for {count} texts")
    tmp = folder / f".{cached.name}.{os.getpid()}.tmp.npy"  # every rank scores (same result); none clobbers another
    np.save(tmp, scores)
    tmp.replace(cached)
    return scores


def domain_order_scores(domains: np.ndarray, order: Sequence[str], *, key: str) -> np.ndarray:
    """Each row's position of its domain in ``order`` (0 = first); every training domain must be named."""
    present = sorted(set(np.asarray(domains).tolist()))
    missing = [d for d in present if d not in order]
    unknown = [d for d in order if d not in present]
    if missing or unknown:
        problem = f"missing {missing[0]}" if missing else f"no training rows in {unknown[0]}"
        raise ConfigError(f"{key}: name every training domain once ({problem}); the training data's domains: "
                          f"{choices_text(present)}")
    rank = {d: i for i, d in enumerate(order)}
    return np.array([rank[d] for d in np.asarray(domains).tolist()], dtype=np.float64)


def rank_difficulty(scores: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(order, difficulty)``: the rows from lowest to highest score (ties in a seeded random order) and each row's
    difficulty ``rank / (N - 1)`` in [0, 1] (0 = the lowest score).  The tie-break is a seeded hash of the row index
    (:func:`effitrain.data.external_order.tiebreak_keys`), so that the order of a corpus sorted in runs on disk
    (:func:`sharded_domain_order`) is this one."""
    from effitrain.data.external_order import tiebreak_keys

    scores = np.asarray(scores, dtype=np.float64)
    order = np.lexsort((tiebreak_keys(seed, 0, len(scores)), scores))  # last key is primary; stable
    return order, difficulty_of(order)


def difficulty_of(order: np.ndarray) -> np.ndarray:
    """Each row's rank in ``order`` as ``rank / (N - 1)`` in [0, 1]."""
    difficulty = np.empty(len(order), np.float64)
    difficulty[order] = np.arange(len(order)) / max(len(order) - 1, 1)
    return difficulty


def is_token_shards(packed: Any) -> bool:
    return hasattr(packed, "rows") and hasattr(packed, "domain_codes")


def row_order(source_scorer: Optional[dict], domain_order: Optional[list], packed: Any, tokenizer: Any, *,
              seed: int, key: str) -> np.ndarray:
    """The rows from lowest to highest score (:func:`rank_difficulty`'s order).  Token shards ordered by a domain
    order are sorted on disk in runs (memory of a budget, not of the corpus) and come back memory-mapped."""
    if domain_order and is_token_shards(packed):
        return sharded_domain_order(packed, domain_order, seed=seed, key=f"{key}.domain_order")
    if source_scorer and is_token_shards(packed):
        if tokenizer is None:
            raise ConfigError(f"{key}.scorer: scoring rows needs the run's tokenizer (this builder was called "
                              f"without one)")
        scores = sharded_row_scores(source_scorer, packed, tokenizer, seed=seed, key=f"{key}.scorer")
        block = 1 << 20
        return _sorted_on_disk(lambda: (scores[s:s + block] for s in range(0, len(scores), block)), len(scores),
                               ("score_order", hashlib.sha256(scores.tobytes()).hexdigest(), packed.folder.name), seed)
    return rank_difficulty(row_scores(source_scorer, domain_order, packed, tokenizer, seed=seed, key=key), seed)[0]


_ORDER_VERSION = 1


def sharded_domain_order(shards: Any, order: Sequence[str], *, seed: int, key: str,
                         budget_bytes: Optional[int] = None) -> np.ndarray:
    """:func:`rank_difficulty` of :func:`domain_order_scores` for token shards, read a block of domain codes at a
    time and sorted in runs (:mod:`effitrain.data.external_order`); cached by the shards, the order and the seed."""
    from effitrain.data.shards import code_counts

    codes, names = shards.domain_codes(), [str(n) for n in shards.domain_names]
    block = 1 << 20
    counts = code_counts(codes, len(names), block)
    present = np.asarray([n for n, c in zip(names, counts) if c], dtype=str)
    domain_order_scores(present, order, key=key)  # the same refusal as in memory: every training domain, once
    rank = np.array([order.index(n) if n in order else -1 for n in names], dtype=np.float64)
    return _sorted_on_disk(lambda: (rank[np.asarray(codes[s:s + block])] for s in range(0, len(codes), block)),
                           len(codes), ("domain_order", shards.folder.name, list(order)), seed, budget_bytes)


def _sorted_on_disk(blocks: Any, n_rows: int, identity: tuple, seed: int,
                    budget_bytes: Optional[int] = None) -> np.ndarray:
    """:func:`rank_difficulty`'s order of the scores ``blocks()`` yields (consecutive rows), sorted in runs on disk
    (:mod:`effitrain.data.external_order`) and memory-mapped; cached by ``identity`` and the seed."""
    from effitrain.data.cache import ContentHash, build_once
    from effitrain.data.external_order import ORDER_BUDGET_BYTES, sorted_order

    budget = ORDER_BUDGET_BYTES if budget_bytes is None else budget_bytes
    folder = build_once("curriculum_orders", ContentHash(identity[0], _ORDER_VERSION, *identity[1:], seed).hexdigest(),
                        lambda out: sorted_order(blocks(), n_rows, seed, out / "order.npy", budget_bytes=budget))
    return np.load(folder / "order.npy", mmap_mode="r")


def row_scores(source_scorer: Optional[dict], domain_order: Optional[list], packed: Any, tokenizer: Any, *,
               seed: int, key: str) -> np.ndarray:
    """The scores of a curriculum's declared source (exactly one of ``scorer`` and ``domain_order``)."""
    from effitrain.data.packing import domain_array, to_numpy

    if domain_order:
        return domain_order_scores(domain_array(packed), domain_order, key=f"{key}.domain_order")
    if tokenizer is None:
        raise ConfigError(f"{key}.scorer: scoring rows needs the run's tokenizer (this builder was called without "
                          f"one)")
    return scorer_row_scores(source_scorer, to_numpy(packed), tokenizer, seed=seed, key=f"{key}.scorer")
