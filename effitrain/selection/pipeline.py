"""The builder behind every scored selection preset: target -> cache look-up -> scorer -> selector -> manifest."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import numpy as np

from effitrain.selection import manifest as mf
from effitrain.selection.base import Context, Scores, Selection, add_token_counts, column_numpy
from effitrain.selection.fingerprints import map_fingerprint, map_num_proc, model_fingerprint
from effitrain.selection.target import resolve_target

log = logging.getLogger("effitrain.selection")

# a chat pool keeps its conversations (the rows are built from them after selection)
ORIGINAL_COLUMNS = ("id", "text", "domain", "messages", "rejected")


def params_dict(params: Any) -> dict:
    """Every parameter that changes the output (num_proc, batch_size and cache do not), the scorer's ``VERSION``
    (bumped when its arithmetic changes, so old manifests are not reused), plus a fingerprint (file names, sizes,
    modification times) of a reference model folder."""
    out = {"scorer": params.scorer, "selector": params.selector,
           "scorer_version": getattr(params.scorer_block.params, "VERSION", 1),
           "budget": dataclasses.asdict(params.budget),
           "target": dataclasses.asdict(params.target) if params.target is not None else None}
    # only when set: the manifests of whole-pool selections keep their keys
    if getattr(params, "domains", None) is not None:
        out["domains"] = sorted(params.domains)
    path = params.scorer.get("model_path")
    if path:  # a reference model retrained in place must not reuse the old manifest
        out["reference_model"] = model_fingerprint(path)
    return json.loads(json.dumps(out, sort_keys=True, default=str))


def cache_root(cache_dir: Optional[Any]) -> Path:
    if cache_dir is None:
        from effitrain.paths import cache_dir as default_cache
        return default_cache("selection")
    return Path(cache_dir)


def _domain_counts(ds: Any) -> dict:
    if "domain" not in ds.column_names or len(ds) == 0:
        return {}
    counts: Counter = Counter()
    for batch in ds.select_columns(["domain"]).with_format("arrow").iter(batch_size=65536):
        counts.update(batch.column("domain").to_pylist())
    return dict(sorted(counts.items()))


def _domain_scope(candidates: Any, domains: Optional[list[str]]) -> tuple[np.ndarray, np.ndarray]:
    """``(indices selected among, indices kept whole)``: with ``domains`` set, the selection chooses only among those
    domains' documents and keeps every other document (no filter, no budget)."""
    everything = np.arange(len(candidates))
    if domains is None:
        return everything, everything[:0]
    from effitrain.registry import ConfigError, choices_text

    column = np.asarray(candidates["domain"])
    present = sorted(set(column.tolist()))
    missing = sorted(set(domains) - set(present))
    if missing:
        raise ConfigError(f"selection.domains: '{missing[0]}' has no candidate documents; the pool's domains: "
                          f"{choices_text(present)}")
    scoped = np.isin(column, list(domains))
    return everything[scoped], everything[~scoped]


def build_scored(params: Any, pool: Any, *, cache_dir: Any = None, seed: int = 0,
                 method: Optional[str] = None, force: bool = False) -> Selection:
    """Run (or reuse) a scored selection.  ``method`` defaults to the preset's registered name."""
    from effitrain.registry import REGISTRY

    if method is None:
        method = next(n for n in REGISTRY.names("selection")
                      if REGISTRY.get("selection", n).params is type(params))
    t0 = time.perf_counter()
    target, candidates = resolve_target(params.target, pool, seed)
    pool_hash = mf.content_hash(pool["train"])
    target_hash = mf.content_hash(target, columns=("text",)) if target is not None else None
    pdict = params_dict(params)
    key = mf.manifest_key(pool_hash=pool_hash, target_hash=target_hash, method=method, params=pdict, seed=seed)
    folder = mf.manifest_dir(cache_root(cache_dir), method, key)

    cached = mf.load(folder, key, len(candidates)) if (params.cache and not force) else None
    if cached is not None:
        header, index = cached
        train = candidates.select(index).select_columns([c for c in ORIGINAL_COLUMNS if c in candidates.column_names])
        # seconds / examples_per_s stay those of the run that scored; reuse_seconds is this look-up
        info = {**header["info"], "cache_hit": True, "reuse_seconds": round(time.perf_counter() - t0, 3)}
        log.info("selection %s: reused manifest %s (%d of %d examples)", method, folder, len(train),
                 len(candidates))
        return Selection(train=train, manifest_path=str(folder / "manifest.json"), info=info)

    log.info("selection %s: scoring %d candidates (scorer %s, selector %s)", method, len(candidates),
             params.scorer["name"], params.selector["name"])
    counted = candidates.map(add_token_counts, batched=True, batch_size=params.batch_size,
                             num_proc=map_num_proc(params.num_proc, len(candidates)),
                             new_fingerprint=map_fingerprint(candidates, "n_tokens"),
                             desc="selection: token counts")
    n_tokens = column_numpy(counted, "n_tokens", np.int64)

    ctx = Context(target=target, seed=seed, num_proc=params.num_proc, batch_size=params.batch_size,
                  work_dir=str(folder.parent),
                  # the candidates are the pool minus a held-out target: both hashes identify them
                  candidates_hash=hashlib.sha256(f"{pool_hash}|{target_hash}".encode()).hexdigest())
    scorer = params.scorer_block.build()
    t_score = time.perf_counter()
    result: Scores = scorer.score(counted, ctx)
    score_s = time.perf_counter() - t_score
    scores = np.asarray(result.scores, dtype=np.float64)
    if scores.shape != (len(candidates),):
        raise RuntimeError(f"scorer {params.scorer['name']} returned {scores.shape} scores for "
                           f"{len(candidates)} candidates")

    weights = n_tokens.astype(np.float64) if params.budget.unit == "tokens" else np.ones(len(candidates))
    in_scope, kept_whole = _domain_scope(candidates, params.domains)
    budget = params.budget.fraction * float(weights[in_scope].sum())
    allowed = np.flatnonzero(result.keep) if result.keep is not None else np.arange(len(candidates))
    allowed = np.intersect1d(allowed, in_scope)
    selector = params.selector_block.build()
    rng = np.random.default_rng(seed)
    sub = selector.select(scores[allowed], None if result.clusters is None else result.clusters[allowed],
                          weights[allowed], budget, rng,
                          groups=None if result.groups is None else result.groups[allowed])
    index = np.sort(np.concatenate([allowed[np.asarray(sub, dtype=np.int64)], kept_whole]))

    train = candidates.select(index).select_columns([c for c in ORIGINAL_COLUMNS if c in candidates.column_names])
    seconds = time.perf_counter() - t0
    kept_tokens = int(n_tokens[index].sum())
    info = {
        "method": method, "scorer": params.scorer["name"], "selector": params.selector["name"],
        "pool_examples": len(candidates), "pool_tokens": int(n_tokens.sum()),
        "target_examples": len(target) if target is not None else 0,
        "after_filter_examples": int(len(allowed)),
        "kept_examples": int(len(index)), "kept_tokens": kept_tokens,
        "kept_token_fraction": round(kept_tokens / max(1, int(n_tokens.sum())), 4),
        "budget": dataclasses.asdict(params.budget),
        "kept_domains": _domain_counts(train),
        "seconds": round(seconds, 3), "scoring_seconds": round(score_s, 3),
        "examples_per_s": round(len(candidates) / max(seconds, 1e-9), 1),  # the whole stage, hashing included
        "cache_hit": False, "manifest_key": key, **{f"scorer_{k}": v for k, v in result.info.items()},
    }
    ids = train["id"] if "id" in train.column_names else [str(i) for i in index]
    header = {"key": key, "method": method, "params": pdict, "seed": seed,
              "inputs": {"pool": pool_hash, "target": target_hash},
              "counts": {"pool_examples": len(candidates), "kept_examples": int(len(index))}, "info": info}
    path = mf.write(folder, header, index, ids, scores[index],
                    None if result.clusters is None else result.clusters[index])
    log.info("selection %s: kept %d / %d examples (%.1f%% of tokens) in %.1fs, %.0f examples/s; manifest %s",
             method, len(index), len(candidates), 100 * info["kept_token_fraction"], seconds,
             info["examples_per_s"], path)
    return Selection(train=train, manifest_path=str(path), info=info)

