"""``effitrain prepare [OVERRIDE ...]``: a data-only launch -- build a run's data and stop before the model.

The data of a run is everything :func:`build_run_data` makes: the pool, the selection, the tokenizer and the packed
rows (with ``data.executor``: the sharded scan, selection, tokenize and pack stages, ending in token shards).  Each
piece is cached by content, so the training run with the same overrides starts from the cache instead of building
them again.  This is what a cluster's data job runs: on CPU nodes, ``data.executor=slurm`` submitting its tasks as
SLURM job arrays while this command waits (docs/cluster.md), before the GPU job trains.
"""

from __future__ import annotations

import json
import time
from typing import Any

from effitrain.registry import ConfigError

USAGE = """usage: effitrain prepare [--json] [OVERRIDE ...]

Build the run's data -- the selection, the tokenizer, the packed rows (token shards with data.executor) -- and stop
before the model.  A training run with the same overrides then starts from the cache, e.g.
    effitrain prepare +recipe=dsir dataset=local dataset.path=DIR data.executor=slurm data.tasks=64
    effitrain +recipe=dsir dataset=local dataset.path=DIR data.executor=slurm data.tasks=64   # trains at once"""


def build_run_data(spec: Any) -> tuple[Any, tuple[Any, Any, Any]]:
    """``(selection, (tokenizer, packed train rows, {domain: eval rows}))``: source -> selection -> tokenizer
    (trained on the whole pool) -> packing, for one process (a distributed run calls it on rank 0 first)."""
    if getattr(spec.data, "executor", None) is not None:  # a corpus of files as sharded jobs -> token shards
        from effitrain.data.sharded import build_sharded_splits, shards_info
        from effitrain.selection.base import Selection
        from effitrain.selection.sharded import sharded_selection

        block = spec.block("selection")  # check refuses the selections without a sharded form
        selection = sharded_selection(block.name, block.params, seed=spec.train.seed)
        curriculum = spec.block("curriculum").params
        order = _sharded_order(curriculum)
        # a curriculum that trains on rows conditioned on the documents' metadata (MeCo) names its header
        condition = curriculum.sharded_condition() if hasattr(curriculum, "sharded_condition") else None
        # ... or on knotted rows (Untie the Knots), drawn with the run's seed as in memory
        knots = (*curriculum.sharded_knots(), spec.train.seed) if hasattr(curriculum, "sharded_knots") else None
        tokenizer, shards, eval_rows = build_sharded_splits(spec.block("dataset").params, spec.block("model").params,
                                                            spec.data.engine_settings(), selection=selection,
                                                            order=order, condition=condition, knots=knots)
        info = shards_info(shards, spec.data, None if selection is None else selection.info)
        if order is not None:
            info["order"] = {"curriculum": order.kind, **(order.info or {})}
        return Selection(None, None, info), (tokenizer, shards, eval_rows)
    from datasets import DatasetDict

    from effitrain.data.splits import build_packed_splits
    from effitrain.paths import cache_dir

    pool = spec.block("dataset").build()
    selection = spec.block("selection").build(pool, cache_dir=cache_dir("selection"), seed=spec.train.seed)
    # one tokenizer for every selection of a pool, so that per-token losses stay comparable between methods
    packed = build_packed_splits(spec.block("dataset").params, spec.block("model").params,
                                 DatasetDict(train=selection.train, eval=pool["eval"]),
                                 tokenizer_corpus=pool["train"])
    return selection, packed


def _sharded_order(params: Any) -> Any:
    """The curriculum's order hook for the data engine (``sharded_order``: ``module:Class`` taking its params), or
    None: a curriculum that orders rows does so in the loop."""
    target = getattr(params, "sharded_order", None)
    if not target:
        return None
    import importlib

    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)(params)


def _summary(spec: Any, selection: Any, tokenizer: Any, train: Any, eval_sets: dict, seconds: float) -> dict:
    info = dict(selection.info or {})
    return {"rows": len(train), "seq_len": spec.block("dataset").params.seq_len, "vocab": len(tokenizer),
            "eval_rows": {str(d): len(rows) for d, rows in sorted(eval_sets.items())},
            "token_shards": info.get("token_shards"), "selection": info.get("method", "none"),
            "kept_examples": info.get("kept_examples"), "manifest": info.get("manifest") or selection.manifest_path,
            "seconds": round(seconds, 1)}


def prepare_main(argv: list[str], preflight: Any) -> int:
    """``effitrain prepare``: the exit status (a refusal raises ConfigError, which the CLI prints in one line).
    ``preflight``: the CLI's compose-validate-check of overrides (as a training launch runs it), returning the spec."""
    from effitrain.console import quiet, say

    args = list(argv)
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    as_json = "--json" in args
    overrides = [a for a in args if a != "--json"]
    flags = [a for a in overrides if a.startswith("-")]
    if flags:
        raise ConfigError(f"prepare: unknown option '{flags[0]}'; options: --json, --help (then key=value overrides)")
    spec = preflight(overrides)
    if spec.stages:
        raise ConfigError(f"prepare: this config is a pipeline of {len(spec.stages)} stages "
                          f"({', '.join(s.name for s in spec.stages)}) whose later data may depend on earlier stages' "
                          f"models; prepare builds the data of a single-stage run -- give one stage's overrides")
    start = time.perf_counter()
    with quiet():
        selection, (tokenizer, train, eval_sets) = build_run_data(spec)
        out = _summary(spec, selection, tokenizer, train, eval_sets, time.perf_counter() - start)
        if as_json:
            say(json.dumps(out, indent=2, sort_keys=True))
        else:
            where = out["token_shards"] or "the datasets cache"
            kept = f"; selection {out['selection']} kept {out['kept_examples']:,} documents" if isinstance(
                out["kept_examples"], int) else ""
            say(f"ok: data prepared in {out['seconds']} s: {out['rows']:,} train rows of {out['seq_len']} tokens "
                f"in {where}; eval rows {out['eval_rows']}{kept}")
            say("  a training run with the same overrides starts from this cache")
    return 0
