"""Compose configs with Hydra's compose API (for the tool verbs and the CLI's pre-flight), torch-free.

Hydra does the composing; this module adds what Hydra leaves to the application: a readable one-line error with a
did-you-mean for a misspelt group option, recipe or key, and the rule that two stacked recipes may not set the
same key.
"""

from __future__ import annotations

import contextlib
import itertools
import re
from dataclasses import dataclass
from typing import Any, Optional, Iterable

import yaml

from effitrain.config.tree import (CONFIG_MODULE, PRIMARY, RECIPE_GROUP, SWEEP_GROUP, config_root, group_options,
                                   groups, load_recipe)
from effitrain.registry import ConfigError, choices_text, did_you_mean

MAX_VALIDATED_SWEEP = 256


def recipe_table_rows() -> list[tuple[str, str, str]]:
    """``(name, paper, blocks)`` per recipe; a recipe file that cannot be read is listed with its error instead of
    breaking the whole table."""
    rows = []
    for name in group_options(RECIPE_GROUP):
        try:
            recipe = load_recipe(name)
            meta = recipe.get("recipe") or {}
            if not isinstance(meta, dict):
                raise ConfigError(f"recipe '{name}': the 'recipe:' block must be a mapping")
            paper = str(meta.get("paper", ""))
            paper = paper if len(paper) <= 60 else paper[:57] + "..."
            arxiv = meta.get("arxiv") or ""
            rows.append((name, f"{paper} ({arxiv})" if arxiv else paper, ", ".join(touched_blocks(recipe))))
        except ConfigError as exc:
            rows.append((name, f"BROKEN: {exc}", "-"))
    return rows


def flatten(prefix: str, node: Any, out: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys of a nested mapping (``{"a": {"b": 1}}`` -> ``{"a.b": 1}``), added to ``out``.  A list of
    mappings (``stages:``) is walked with its indices (``stages.1.train.max_steps``); other lists are values."""
    if isinstance(node, dict) and node:
        for key, value in node.items():
            flatten(f"{prefix}.{key}" if prefix else str(key), value, out)
    elif isinstance(node, list) and node and all(isinstance(v, dict) for v in node):
        for index, value in enumerate(node):
            flatten(f"{prefix}.{index}" if prefix else str(index), value, out)
    else:
        out[prefix] = node
    return out


def recipe_keys(recipe: dict[str, Any]) -> dict[str, Any]:
    """The keys a recipe sets, dotted, including the block options it selects (``optimizer`` for
    ``override /optimizer: galore``); the ``recipe:`` metadata itself is not a setting."""
    keys: dict[str, Any] = {}
    for entry in recipe.get("defaults") or []:
        if isinstance(entry, dict):
            for key, value in entry.items():
                keys[str(key).replace("override", "").strip().lstrip("/")] = value
    for key, value in recipe.items():
        if key not in ("defaults", "recipe"):
            flatten(str(key), value, keys)
    return keys


def touched_blocks(recipe: dict[str, Any]) -> list[str]:
    return sorted({key.split(".")[0] for key in recipe_keys(recipe)})


def check_recipe_conflicts(names: list[str]) -> None:
    seen: dict[str, str] = {}
    for name in names:
        for key in recipe_keys(load_recipe(name)):
            for other_key, owner in seen.items():
                overlap = key == other_key or key.startswith(other_key + ".") or other_key.startswith(key + ".")
                if overlap and owner != name:
                    raise ConfigError(f"recipe: '{owner}' and '{name}' both set '{min(key, other_key, key=len)}'; "
                                      f"stacked recipes must not overlap (override the key on the command line "
                                      f"after choosing one recipe)")
        for key in recipe_keys(load_recipe(name)):
            seen.setdefault(key, name)


# ---------------------------------------------------------------------------------------------- overrides
def parse_overrides(args: Iterable[str]) -> list[Any]:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    args = list(args)
    try:
        return OverridesParser.create().parse_overrides(args)
    except OverrideParseException as exc:
        raise ConfigError(f"cannot parse overrides {' '.join(args)}: {str(exc).splitlines()[0]}") from None


def _values(override: Any) -> list[Any]:
    if override.is_sweep_override():
        return list(override.sweep_string_iterator())
    value = override.value()
    return list(value) if isinstance(value, list) else [value]


def recipe_names(overrides: list[Any]) -> list[str]:
    """The recipes selected by ``+recipe=NAME`` or ``'+recipe=[a,b]'`` (the first sweep value if swept)."""
    for o in overrides:
        if o.key_or_group == RECIPE_GROUP and not o.is_delete():
            value = o.value()
            if o.is_sweep_override():
                value = next(iter(o.sweep_string_iterator()))
            return [str(v) for v in (value if isinstance(value, list) else [value])]
    return []


def check_group_choices(overrides: list[Any]) -> None:
    """``model=nope`` and ``+recipe=galroe`` are reported with the valid options before Hydra sees them."""
    all_groups = groups()
    for o in overrides:
        group = o.key_or_group
        if group not in all_groups or o.is_delete() or o.package:
            continue
        options = group_options(group)
        for value in _values(o):
            names = value if isinstance(value, list) else [value]
            if group == RECIPE_GROUP and isinstance(value, str) and value.startswith("["):
                names = [v.strip() for v in value.strip("[]").split(",") if v.strip()]
            for name in names:
                if str(name) not in options:
                    kind = "recipe" if group == RECIPE_GROUP else f"{group} option"
                    raise ConfigError(f"{group}: unknown {kind} '{name}'{did_you_mean(name, options)}; "
                                      f"valid: {choices_text(options)}")
        if group == RECIPE_GROUP and not o.is_add() and not o.is_force_add():
            raise ConfigError(f"recipe: train.yaml selects no recipe, so add one with '+recipe={o.value()}'")


def sweep_config_axes(args: list[str]) -> list[str]:
    """The grid a ``+sweep=NAME`` config hands Hydra's basic sweeper (its ``hydra.sweeper.params``), as overrides, so
    that every member of the grid is validated before any runs.  A search config (it replaces the sweeper, e.g.
    Optuna) has no grid to enumerate: nothing.  An unknown NAME is one line naming the valid ones."""
    names = [a.split("=", 1)[1] for a in args if a.lstrip("+").startswith(f"{SWEEP_GROUP}=")]
    axes: list[str] = []
    for name in names:
        options = group_options(SWEEP_GROUP)
        if name not in options:
            raise ConfigError(f"sweep: unknown sweep '{name}'{did_you_mean(name, options)}; valid: "
                              f"{choices_text(options)}")
        path = config_root() / SWEEP_GROUP / f"{name}.yaml"
        node = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        replaces_sweeper = any(isinstance(d, dict) and any("hydra/sweeper" in k for k in d)
                               for d in node.get("defaults", []))
        params = ((node.get("hydra") or {}).get("sweeper") or {}).get("params") or {}
        if not replaces_sweeper:
            axes += [f"{key}={value}" for key, value in params.items()]
    return axes


def expand_sweeps(args: list[str]) -> list[list[str]]:
    """The overrides of every job of a ``-m`` sweep (up to MAX_VALIDATED_SWEEP jobs are validated), the grid of a
    ``+sweep=NAME`` config included."""
    args = [*args, *sweep_config_axes(args)]
    overrides = parse_overrides(args)
    axes = []
    for o, text in zip(overrides, args):
        if o.is_sweep_override():
            key = o.get_key_element()
            axes.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            axes.append([text])
    return [list(combo) for combo in itertools.islice(itertools.product(*axes), MAX_VALIDATED_SWEEP)]


# ---------------------------------------------------------------------------------------------- compose
@dataclass
class Composed:
    cfg: dict[str, Any]           # resolved, without the `hydra` key
    recipes: list[dict[str, Any]]  # the `recipe:` blocks of the stacked recipes, in order


def _translate(exc: Exception, overrides: list[str]) -> ConfigError:
    cause = exc.__cause__
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    full_key = getattr(cause, "full_key", None)
    if full_key is None or str(full_key).startswith("stages"):
        no_such_stage = _stage_override_error(overrides)
        if no_such_stage is not None:
            return no_such_stage
    if full_key:
        parent, _, leaf = str(full_key).rpartition(".")
        if parent == "methods":
            names = _method_names()
            hint = "" if leaf in names else did_you_mean(leaf, names)
            return ConfigError(f"methods.{leaf}: method not configured{hint}; add it with '+methods.{leaf}.KEY=VALUE' "
                               f"or a recipe that sets it; methods: {choices_text(names)}")
        if type(cause).__name__ in ("ConfigTypeError", "ValidationError"):  # the key exists; the value's shape is wrong
            detail = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
            detail = {"Cannot merge DictConfig with ListConfig": "expected a mapping of keys, got a list",
                      "Cannot merge ListConfig with DictConfig": "expected a list, got a mapping"}.get(detail, detail)
            given = next((o for o in overrides if o.split("=")[0].lstrip("+~") == str(full_key)), None)
            return ConfigError(f"{full_key}: {detail}" + (f" (from '{given}')" if given else "")
                               + "; give a value of the same kind as the default ('effitrain show default')")
        if str(full_key).startswith("stages["):  # a stage's delta holds only the keys it changes
            dotted = re.sub(r"\[(\d+)\]", r".\1", str(full_key))
            return ConfigError(f"{dotted}: the stage does not set this key yet; add it with '+{dotted}=VALUE'")
        # the structure without any key overrides (group choices and recipes only) tells what keys exist
        all_groups = set(groups())
        valid = _keys_at(parent, [o for o in overrides
                                  if o.split("=")[0].lstrip("+~") in all_groups])
        hint = did_you_mean(leaf, valid)
        if not valid and parent and _keys_at(parent.rpartition(".")[0], [o for o in overrides if o.split("=")[0]
                                                                   .lstrip("+~") in all_groups]).count(
                parent.rpartition(".")[2]):
            # the parent is a mapping that starts empty (e.g. curriculum.phases): Hydra adds keys only with '+'
            return ConfigError(f"{full_key}: {parent} starts empty, so its entries are added one by one: "
                               f"'+{full_key}=VALUE'")
        if not valid:
            return ConfigError(f"{full_key}: unknown key{hint}; 'effitrain show default' prints the keys that exist")
        return ConfigError(f"{full_key}: unknown key{hint}; valid keys: {choices_text(valid)}")
    if "Ambiguous value for argument" in message or "Multiple values for recipe" in message:
        return ConfigError("recipe: give recipes once, as '+recipe=[a,b]' (quoted) to stack them, or sweep them with "
                           "-m '+recipe=a,b'")
    return ConfigError(message)


def _stage_override_error(overrides: list[str]) -> Optional[ConfigError]:
    """A ``stages.N.KEY`` override whose N is no stage of the recipe (or of a config without stages): the stages
    that exist, by index.  Adding the stage with '+stages.N=...' fails the same way, so it is never suggested."""
    given = [o.split("=")[0].lstrip("+~") for o in overrides if o.split("=")[0].lstrip("+~").startswith("stages.")]
    if not given:
        return None
    structure = set(groups()) | {"stages"}  # the recipes chosen, and a whole stages list given on the command line
    try:
        stages = compose_raw([o for o in overrides if o.split("=")[0].lstrip("+~") in structure]).get("stages")
    except Exception:  # noqa: BLE001 - a best-effort explanation only
        return None
    names = [s.get("name") if isinstance(s, dict) else "?" for s in stages] if isinstance(stages, list) else []
    for key in given:
        parts = key.split(".")
        if not names:
            return ConfigError(f"{key}: this configuration has no stages; stages.N.KEY changes one stage of a "
                               f"multi-stage recipe (e.g. +recipe=g_stack); for this run set "
                               f"'{'.'.join(parts[2:]) or 'KEY'}=VALUE'")
        index = parts[1] if len(parts) > 1 else ""
        if not index.isdigit() or int(index) >= len(names):
            listing = ", ".join(f"stages.{i} ({n})" for i, n in enumerate(names))
            named = f"; '{index}' is stages.{names.index(index)}" if index in names else ""
            return ConfigError(f"{key}: no such stage{named}; the recipe has {len(names)} stages, counted from 0: "
                               f"{listing}; change one with stages.N.KEY=VALUE")
    return None


def _method_names() -> list[str]:
    from effitrain.config.blocks import load_builtin_blocks
    from effitrain.registry import REGISTRY

    load_builtin_blocks()
    return REGISTRY.names("method")


def _keys_at(parent: str, overrides: list[str]) -> list[str]:
    """The keys a block takes: its registered parameters where the block names a registry entry, else the YAML's."""
    from effitrain.config.blocks import load_builtin_blocks
    from effitrain.registry import REGISTRY

    try:
        node = compose_raw(overrides)
    except Exception:  # noqa: BLE001 - a best-effort hint only
        return []
    parts = [p for p in parent.split(".") if p]
    if not parts:  # a top-level key: the run-level schema says what exists
        from effitrain.config.spec import ROOT_KEYS
        return sorted(ROOT_KEYS - {"hydra"})
    for part in parts:
        node = node.get(part, {}) if isinstance(node, dict) else {}
    if not isinstance(node, dict):
        return []
    load_builtin_blocks()
    group = "method" if parts[:1] == ["methods"] and len(parts) == 2 else parts[-1] if parts else None
    name = parts[1] if group == "method" else node.get("name")
    if group and isinstance(name, str) and name in REGISTRY.names(group):
        import dataclasses

        return ["name", *(f.name for f in dataclasses.fields(REGISTRY.get(group, name).params))]
    return list(node)


@contextlib.contextmanager
def _outside_running_app():
    """Compose as if no Hydra app were running, then give the running one back.

    A run started by the console script runs inside ``hydra.main``, which holds Hydra's global state; a config
    composed during that run (``model=demo_base`` composes its base model's own run) would otherwise fail with
    "GlobalHydra is already initialized".  Hydra's ``initialize`` restores what it found on exit but refuses to start
    while an app holds the state, so the app's state is set aside here for the duration."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.singleton import Singleton

    running = Singleton._instances.pop(GlobalHydra, None) if GlobalHydra.instance().is_initialized() else None
    try:
        yield
    finally:
        if running is not None:
            Singleton._instances[GlobalHydra] = running


def compose_raw(overrides: list[str], choices: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """The composed config, resolved, without the ``hydra`` node; ``choices`` (when given) receives the option
    Hydra picked for every group (``hydra.runtime.choices``: what effitrain.config.provenance attributes keys to)."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf, open_dict

    with _outside_running_app():
        with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
            cfg = compose(PRIMARY, overrides=overrides, return_hydra_config=choices is not None)
    if choices is not None:
        choices.update({str(g): str(c) for g, c in cfg.hydra.runtime.choices.items() if c is not None})
        with open_dict(cfg):
            del cfg["hydra"]
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def compose_config(overrides: list[str], choices: Optional[dict[str, str]] = None) -> Composed:
    """Compose ``train.yaml`` with the overrides, checked: unknown options, recipe conflicts, unknown keys."""
    from effitrain.config.launcher import check_launcher

    parsed = parse_overrides(overrides)
    check_group_choices(parsed)
    check_launcher(parsed)
    names = recipe_names(parsed)
    check_recipe_conflicts(names)
    try:
        cfg = compose_raw(overrides, choices)
    except ConfigError:
        raise
    except Exception as exc:  # Hydra/OmegaConf errors: turn them into one readable line
        raise _translate(exc, overrides) from None
    cfg.pop("hydra", None)
    from effitrain.config.stages import propagate_overrides

    propagate_overrides(cfg, parsed)  # `train.max_steps=3` shortens every stage of a multi-stage recipe
    recipes = [load_recipe(n).get("recipe") or {"name": n, "paper": "?"} for n in names]
    return Composed(cfg, recipes)
