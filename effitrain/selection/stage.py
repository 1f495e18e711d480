"""The selection stage on its own: ``effitrain select [overrides...]`` and the call the training run makes.

``run_selection(cfg_or_spec)`` builds the dataset block (the pool) and the selection block, and returns the
:class:`~effitrain.selection.base.Selection`; the manifest is cached (see :mod:`effitrain.selection.manifest`), so
the training run that follows ``effitrain select`` with the same overrides reuses it instead of scoring again.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from typing import Any, Optional

from effitrain.registry import ConfigError
from effitrain.selection.base import Selection

log = logging.getLogger("effitrain.selection")


def _spec(cfg_or_spec: Any) -> Any:
    """A RunSpec from a RunSpec, a ``Composed`` (``compose_config``'s result), a mapping or a DictConfig."""
    from effitrain.config.spec import validate
    if hasattr(cfg_or_spec, "cfg") and hasattr(cfg_or_spec, "recipes"):
        return validate(cfg_or_spec.cfg, cfg_or_spec.recipes)
    if isinstance(cfg_or_spec, Mapping) or type(cfg_or_spec).__name__ == "DictConfig":
        cfg = cfg_or_spec
        if type(cfg).__name__ == "DictConfig":
            from omegaconf import OmegaConf
            cfg = OmegaConf.to_container(cfg, resolve=True)
        return validate(cfg)
    return cfg_or_spec


def run_selection(cfg_or_spec: Any, *, pool: Any = None, cache_dir: Optional[Any] = None,
                  force: bool = False) -> Selection:
    """Run (or reuse) the configured selection.

    ``cfg_or_spec``: a validated ``RunSpec``, ``compose_config``'s result or a composed mapping (validated here).
    ``pool``: the DatasetDict, built from the ``dataset`` block (cache ``$EFFITRAIN_CACHE/datasets``, as the training
    run does) when not given.  ``cache_dir``: the folder of the manifests (default ``$EFFITRAIN_CACHE/selection``,
    the one the training run uses).  ``force``: score again even if a manifest exists.
    """
    from effitrain.paths import cache_dir as default_cache

    spec = _spec(cfg_or_spec)
    if pool is None:
        pool = spec.block("dataset").build(cache_dir=default_cache("datasets"))
    if cache_dir is None:
        cache_dir = default_cache("selection")
    block = spec.block("selection")
    seed = spec.train.seed
    if force and block.entry.builder.endswith(":build_scored"):
        from effitrain.selection.pipeline import build_scored
        return build_scored(block.params, pool, cache_dir=cache_dir, seed=seed, method=block.name, force=True)
    return block.build(pool, cache_dir=cache_dir, seed=seed)


USAGE = """usage: effitrain select [--force] [--json] [--cache-dir DIR] [OVERRIDE ...]

Run the data-selection stage alone (scores, selects, writes the manifest) with the same config composition as a
training run, e.g.  effitrain select selection=dsir selection.target.domain=code selection.budget.fraction=0.2
A training run with the same overrides then reuses the manifest."""


def select_main(argv: list[str]) -> int:
    """CLI entry for ``effitrain select``: returns the exit status (2 for a configuration error)."""
    force = as_json = False
    cache_dir = None
    overrides: list[str] = []
    args = list(argv)
    while args:
        a = args.pop(0)
        if a in ("-h", "--help"):
            print(USAGE)
            return 0
        if a == "--force":
            force = True
        elif a == "--json":
            as_json = True
        elif a == "--cache-dir":
            if not args:
                print("effitrain: error: select: --cache-dir needs a folder", file=sys.stderr)
                return 2
            cache_dir = args.pop(0)
        elif a.startswith("--cache-dir="):
            cache_dir = a.split("=", 1)[1]
        else:
            overrides.append(a)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        from effitrain.config.compose import compose_config
        result = run_selection(compose_config(overrides), cache_dir=cache_dir, force=force)
    except ConfigError as exc:
        print(f"effitrain: error: {exc}", file=sys.stderr)
        return 2
    out = {"manifest": result.manifest_path, **result.info}
    if as_json:
        print(json.dumps(out, indent=2, sort_keys=True, default=str))
    else:
        for k, v in out.items():
            print(f"{k:>22}: {v}")
    return 0


if __name__ == "__main__":  # python -m effitrain.selection.stage ...
    raise SystemExit(select_main(sys.argv[1:]))
