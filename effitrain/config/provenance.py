"""Where every key of a composed config came from: the layers Hydra merges, in its order, and which of them set a key.

A run's config is built in layers, each applied over the ones before (Hydra's defaults list, ``_self_`` last):

1. the option file of every block group (``configs/optimizer/adamw.yaml``), whichever chose it -- the primary's
   defaults, a recipe's ``override /group: option``, or the command line's ``group=option``;
2. the primary config's own keys (``configs/train.yaml``: ``train.*``, ``methods``, ``timeline``);
3. each recipe of ``+recipe=NAME`` / ``+recipe=[a,b]``, in order (``recipes/NAME.yaml``);
4. each command-line key override, in order (``optimizer.lr=1e-3``, ``+methods.x={}``, ``~key``); a run-level key
   such as ``train.max_steps=3`` also sets it in every stage of a multi-stage recipe.

A key's provenance is the last layer that sets it; :func:`chain` lists every layer that does, with its value.  The
layers are read from the files and overrides themselves (the group choices from Hydra's own
``hydra.runtime.choices``), so a key set to the value it already had is still attributed to the layer that set it.
Torch-free: composition only.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from effitrain.config.compose import compose_config, flatten, parse_overrides, recipe_names
from effitrain.config.tree import PRIMARY, RECIPE_GROUP, config_root, groups, load_recipe
from effitrain.registry import ConfigError, did_you_mean_key

UNSET = "<unset>"
#: keys that say where, when or how a run was launched, not what it is (a timestamped default folder, a resume)
IGNORED = ("run_dir", "recipe.", "resume", "overwrite")


@dataclass
class Layer:
    source: str                 # e.g. "recipes/galore.yaml", "command line: optimizer.lr=1e-3"
    keys: dict[str, Any]        # the dotted keys it sets, with the values it gives them
    removes: tuple[str, ...] = ()  # keys (and their children) a `~key` override deletes


@dataclass
class Provenance:
    values: dict[str, Any]                 # the composed config, flattened (what the run sees)
    layers: list[Layer]

    def source(self, key: str) -> str:
        setters = [layer for layer in self.layers if key in layer.keys or _removed(layer, key)]
        return setters[-1].source if setters else "(not set by any layer)"

    def chain(self, key: str) -> list[tuple[str, Any]]:
        out = []
        for layer in self.layers:
            if key in layer.keys:
                out.append((layer.source, layer.keys[key]))
            elif _removed(layer, key):
                out.append((layer.source, UNSET))
        return out


def _removed(layer: Layer, key: str) -> bool:
    return any(key == r or key.startswith(r + ".") for r in layer.removes)


def _relative(path: Path) -> str:
    root = config_root()
    try:
        rel = path.relative_to(root)
    except ValueError:
        return str(path)
    return f"recipes/{rel.relative_to(RECIPE_GROUP)}" if rel.parts[0] == RECIPE_GROUP else f"configs/{rel}"


def _primary_defaults() -> dict[str, str]:
    primary = yaml.safe_load((config_root() / f"{PRIMARY}.yaml").read_text()) or {}
    out = {}
    for entry in primary.get("defaults") or []:
        if isinstance(entry, dict):
            for group, option in entry.items():
                if group in groups():
                    out[group] = str(option)
    return out


def build_layers(overrides: list[str], choices: dict[str, str]) -> list[Layer]:
    """The layers of ``overrides``' config, in Hydra's order; ``choices``: the group options Hydra picked."""
    parsed = parse_overrides(overrides)
    names = recipe_names(parsed)
    recipes = {n: load_recipe(n) for n in names}
    chooser: dict[str, str] = {g: "default" for g in _primary_defaults()}
    for name, recipe in recipes.items():
        for entry in recipe.get("defaults") or []:
            if isinstance(entry, dict):
                for key in entry:
                    group = str(key).replace("override", "").strip().lstrip("/")
                    if group in groups():
                        chooser[group] = f"recipe {name}"
    cli_groups = {o.key_or_group for o in parsed if o.key_or_group in groups() and not o.is_delete()}
    for group in cli_groups:
        chooser[group] = "command line"

    layers: list[Layer] = []
    for group, option in sorted((g, c) for g, c in choices.items() if g in groups()):
        path = config_root() / group / f"{option}.yaml"
        content = yaml.safe_load(path.read_text()) or {}
        content.pop("defaults", None)
        layers.append(Layer(f"{_relative(path)} (chosen by {chooser.get(group, 'default')})",
                            flatten(group, content, {})))
    primary = yaml.safe_load((config_root() / f"{PRIMARY}.yaml").read_text()) or {}
    primary.pop("defaults", None)
    primary.pop("hydra", None)
    layers.append(Layer(f"configs/{PRIMARY}.yaml", flatten("", primary, {})))
    for name, recipe in recipes.items():
        body = {k: v for k, v in recipe.items() if k not in ("defaults", "recipe")}
        layers.append(Layer(_relative(config_root() / RECIPE_GROUP / f"{name}.yaml"), flatten("", body, {})))
    stage_count = max((len(r.get("stages") or []) for r in recipes.values()), default=0)
    for override, text in zip(parsed, overrides):
        key = override.key_or_group
        if key in groups() or key == RECIPE_GROUP or key.startswith("hydra"):
            continue
        where = f"command line: {text}"
        if override.is_delete():
            layers.append(Layer(where, {}, removes=(key,)))
            continue
        value = override.value()
        keys = flatten(key, value, {}) if isinstance(value, (dict, list)) and value else {key: value}
        if stage_count and not key.startswith("stages."):  # a run-level key shortens/changes every stage too
            keys.update({f"stages.{i}.{k}": v for i in range(stage_count) for k, v in list(keys.items())})
        layers.append(Layer(where, keys))
    return layers


def provenance(overrides: list[str]) -> Provenance:
    choices: dict[str, str] = {}
    composed = compose_config(overrides, choices)
    values = {k: v for k, v in flatten("", composed.cfg, {}).items() if not k.startswith(IGNORED)}
    return Provenance(values, build_layers(overrides, choices))


# ------------------------------------------------------------------------------------------------ sides of a diff
def side_overrides(side: str) -> tuple[list[str], str]:
    """What one side of ``effitrain diff`` names, as overrides, and its label: a recipe (``galore``), a stack
    (``galore+lisa``), ``default`` or an override list (``'optimizer=galore optimizer.lr=1e-3'``).  A run
    directory is not replayed from its command line: :func:`run_provenance` reads the values it ran with."""
    if "=" in side or " " in side:
        return shlex.split(side), side
    if side in ("default", PRIMARY):
        return [], "default"
    names = side.split("+")
    for name in names:
        load_recipe(name)  # an unknown recipe: one line naming the valid ones
    return ([f"+recipe={names[0]}"] if len(names) == 1 else [f"+recipe=[{','.join(names)}]"]), side


def _stored_values(run_dir: Path) -> dict[str, Any]:
    """The run's resolved configuration as it ran (``config.yaml``), flattened."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"diff: '{run_dir}' is a folder but holds no run (no config.yaml)")
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
        raise ConfigError(f"diff: {path} is not valid YAML{at}; the run's configuration is unknown") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"diff: {path} holds a {type(cfg).__name__}, not a configuration mapping")
    return {k: v for k, v in flatten("", cfg, {}).items() if not k.startswith(IGNORED)}


def run_provenance(run_dir: Path, overrides: list[str]) -> Provenance:
    """A run directory as a side of a diff: the values of its ``config.yaml`` (what it ran with, whatever its command
    line said: resumed horizons, stages' propagated keys, edits), then ``key=value`` overrides given to both sides."""
    stored = _stored_values(run_dir)
    layers = [Layer(f"{run_dir}/config.yaml", dict(stored))]
    values = dict(stored)
    for override, text in zip(parse_overrides(overrides), overrides):
        key = override.key_or_group
        if key in groups() or key == RECIPE_GROUP:
            raise ConfigError(f"diff: '{text}' chooses a block or recipe, which a finished run cannot change; with a "
                              f"run directory as a side give key=value overrides only")
        if override.is_delete():
            values = {k: v for k, v in values.items() if k != key and not k.startswith(key + ".")}
            layers.append(Layer(f"command line: {text}", {}, removes=(key,)))
            continue
        value = override.value()
        keys = flatten(key, value, {}) if isinstance(value, (dict, list)) and value else {key: value}
        values.update(keys)
        layers.append(Layer(f"command line: {text}", keys))
    return Provenance(values, layers)


def side_provenance(side: str, shared: list[str]) -> tuple[Provenance, str]:
    from effitrain.fsutil import why_missing

    path = Path(side)
    if os.path.lexists(path) and not path.exists():
        raise ConfigError(f"diff: '{side}' {why_missing(path)}")
    if path.is_dir():
        return run_provenance(path, shared), side
    overrides, label = side_overrides(side)
    return provenance(overrides + shared), label


@dataclass
class DiffRow:
    key: str
    a: Any
    a_source: str
    b: Any
    b_source: str


def diff(a: str, b: str, shared: Optional[list[str]] = None) -> tuple[list[DiffRow], str, str]:
    shared = list(shared or [])
    (pa, la), (pb, lb) = side_provenance(a, shared), side_provenance(b, shared)
    rows = []
    for key in sorted(set(pa.values) | set(pb.values)):
        va, vb = pa.values.get(key, UNSET), pb.values.get(key, UNSET)
        # an empty mapping on one side (`methods: {}`) is a leaf only because nothing is under it: the other side's
        # keys under it are the difference, not the mapping itself
        if _empty_parent(key, va, pb.values) or _empty_parent(key, vb, pa.values):
            continue
        if va != vb:
            rows.append(DiffRow(key, va, pa.source(key), vb, pb.source(key)))
    return rows, la, lb


def _empty_parent(key: str, value: Any, other: dict[str, Any]) -> bool:
    return value == {} and any(k.startswith(key + ".") for k in other)


def format_diff(rows: list[DiffRow], a: str, b: str, fmt: str = "text") -> str:
    if fmt == "markdown":
        lines = [f"| key | {a} | set by | {b} | set by |", "|---|---|---|---|---|"]
        def cell(value: Any, source: str) -> str:
            return f"{UNSET} | —" if value == UNSET else f"`{value!r}` | {source}"

        lines += [f"| `{r.key}` | {cell(r.a, r.a_source)} | {cell(r.b, r.b_source)} |" for r in rows]
        return "\n".join(lines) if rows else f"{a} and {b} resolve to the same config"
    if not rows:
        return "no differences"
    def side(value: Any, source: str) -> str:
        return UNSET if value == UNSET else f"{value!r} [{source}]"

    return "\n".join(f"{r.key}: {side(r.a, r.a_source)} -> {side(r.b, r.b_source)}" for r in rows)


def explain(key: str, overrides: list[str]) -> str:
    p = provenance(overrides)
    chain = p.chain(key)
    if key not in p.values and not chain:
        near = did_you_mean_key(key, list(p.values))
        raise ConfigError(f"explain: no key '{key}' in this config{near}; 'effitrain show default' lists the keys")
    lines = [f"{key} = {p.values.get(key, UNSET)!r}"]
    for i, (source, value) in enumerate(chain):
        lines.append(f"  {i + 1}. {source}: {value!r}" + ("   <- wins" if i == len(chain) - 1 else ""))
    if not chain:
        lines.append("  (no file or override sets it; it comes from an interpolation)")
    return "\n".join(lines)
