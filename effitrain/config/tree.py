"""The config tree that ships inside the package (``effitrain/configs``): where it is, its groups and their options,
the recipes, and which groups are blocks.  Torch-free and Hydra-free: the bottom of the config layer, which the
modules that compose, validate and stage configs all read (so none of them needs another to find a file)."""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from effitrain.registry import ConfigError, choices_text, did_you_mean

CONFIG_MODULE = "effitrain.configs"
PRIMARY = "train"
RECIPE_GROUP = "recipe"
SWEEP_GROUP = "sweep"


def config_root() -> Path:
    return Path(str(resources.files(CONFIG_MODULE)))


@functools.lru_cache(maxsize=None)
def group_options(group: str) -> tuple[str, ...]:
    folder = config_root() / group
    return tuple(sorted(p.stem for p in folder.glob("*.yaml"))) if folder.is_dir() else ()


def groups() -> tuple[str, ...]:
    # hydra/ holds Hydra's own groups (the launcher presets, effitrain.config.launcher) and sweep/ the sweep configs
    # (`-m +sweep=NAME`, Hydra's sweeper settings): neither is a block
    return tuple(sorted(p.name for p in config_root().iterdir()
                        if p.is_dir() and not p.name.startswith("_") and p.name not in ("hydra", SWEEP_GROUP)))


def load_recipe(name: str) -> dict[str, Any]:
    options = group_options(RECIPE_GROUP)
    if name not in options:
        raise ConfigError(f"recipe: unknown recipe '{name}'{did_you_mean(name, options)}; "
                          f"valid: {choices_text(options)}")
    path = config_root() / RECIPE_GROUP / f"{name}.yaml"
    try:
        with open(path, encoding="utf-8") as fh:
            recipe = yaml.safe_load(fh) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe '{name}': {yaml_error_text(path, exc)}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"recipe '{name}': cannot read {path}: {exc}") from None
    if not isinstance(recipe, dict):
        raise ConfigError(f"recipe '{name}': {path} must hold a mapping (defaults, recipe, keys), "
                          f"not {type(recipe).__name__}")
    return recipe


def yaml_error_text(path: Path, exc: Exception) -> str:
    """``<file>, line N, column M: <problem>`` of a YAML syntax error, on one line."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"YAML error in {path}{where}: {problem}"


#: the groups of ``train.yaml`` whose option is a registered block (a ``name:`` the registry builds)
BLOCK_GROUPS = ("model", "dataset", "selection", "curriculum", "peft", "optimizer", "scheduler", "precision",
                "parallelism", "logger", "eval", "objective")
#: groups added after runs already existed: a stored config without them gets this option (resume, export)
OPTIONAL_GROUPS = {"eval": {"name": "none"}, "objective": {"name": "causal_lm"}}
