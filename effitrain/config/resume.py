"""Resuming remembers: a run continues with the configuration and recipes it was started with.

``effitrain resume RUN_DIR [KEY=VALUE ...]`` — and ``effitrain run_dir=RUN_DIR resume=auto [KEY=VALUE ...]``,
which means the same — reload ``RUN_DIR/config.yaml`` (the resolved config of the first launch) and
``RUN_DIR/recipes.yaml``; the command line may change only the keys in :data:`RESUME_SAFE_KEYS`, which decide how
long and how visibly the run goes on, not what it computes.  Giving another key its stored value is allowed (so the
original command line plus ``resume=auto`` works); giving it a different value is refused with the differences.
Torch-free: it runs in the pre-flight.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import yaml

from effitrain.config.compose import RECIPE_GROUP, flatten, parse_overrides
from effitrain.registry import ConfigError

# train.max_steps may change: the schedule then follows the new horizon from the resumed step on, and the run says so.
RESUME_SAFE_KEYS = ("train.max_steps", "train.eval_every", "train.eval_batches", "train.save_every",
                    "train.keep_checkpoints", "train.log_every", "train.max_bad_steps", "train.save_final_model",
                    "train.save_every_minutes", "logger.", "eval.", "methods.samples.", "run_dir", "resume",
                    "overwrite")
RECIPES_FILE = "recipes.yaml"


def _safe(key: str) -> bool:
    parts = key.split(".")
    if len(parts) > 2 and parts[0] == "stages" and parts[1].isdigit():  # a stage's own train.max_steps, logger.*
        key = ".".join(parts[2:])
    return key.startswith(RESUME_SAFE_KEYS)


def _safe_keys_text() -> str:
    return ", ".join(k.rstrip(".") + ("*" if k.endswith(".") else "") for k in RESUME_SAFE_KEYS[:-3])


def stored_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"resume: '{run_dir}' holds no effitrain run (no config.yaml); start it without resume")
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        raise ConfigError(f"resume: {path} is not valid YAML; the run's configuration is unknown") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"resume: {path} does not hold a configuration mapping")
    return cfg


def stored_recipes(run_dir: Path, cfg: dict[str, Any]) -> Optional[list[dict[str, Any]]]:
    path = run_dir / RECIPES_FILE
    if path.is_file():
        return yaml.safe_load(path.read_text()) or []
    return None  # a run from before recipes.yaml: validation falls back to the config's own `recipe:` block


def remembers(overrides: list[str]) -> bool:
    """True when every override sets a dotted key or a run-level key: then the run's stored config can be used.
    Group choices (``model=…``, ``+recipe=…``) cannot be compared key by key and take the composing path."""
    from effitrain.config.spec import BLOCK_GROUPS

    for override in parse_overrides(overrides):
        key = override.key_or_group
        if key == RECIPE_GROUP or key in BLOCK_GROUPS or override.is_delete():
            return False
    return True


def remembered_config(run_dir: Path, overrides: list[str]) -> tuple[dict[str, Any], Optional[list[dict]]]:
    """The run's stored config with the command line's safe overrides applied, set to resume in ``run_dir``."""
    cfg = stored_config(run_dir)
    stored = flatten("", cfg, {})
    changed = {}
    for override in parse_overrides(overrides):
        key, value = override.key_or_group, override.value()
        if key in ("run_dir", "resume", "overwrite"):
            continue
        if override.is_sweep_override():
            raise ConfigError(f"{key}: a resumed run takes one value, not a sweep")
        if not _safe(key) and stored.get(key, "<unset>") != value:
            changed[key] = (stored.get(key, "<unset>"), value)
            continue
        _set(cfg, key, value)
    if changed:
        shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(changed.items())[:4])
        raise ConfigError(f"resume: {shown} cannot change when a run resumes (it changes what the run computes); "
                          f"only {_safe_keys_text()} may; start a new run_dir for a different configuration")
    cfg.update(run_dir=str(run_dir), resume="auto", overwrite=False)
    from effitrain.config.stages import propagate_overrides

    propagate_overrides(cfg, parse_overrides(overrides))  # e.g. train.max_steps reaches every stage's delta
    return cfg, stored_recipes(run_dir, cfg)


def saved_layout(run_dir: Path, cfg: dict[str, Any]) -> Optional[tuple[int, int, int]]:
    """(world size, micro batch, grad accum) of the newest complete checkpoint's launch, from its meta.json; for a
    checkpoint from before that record, the run's stored config and the world size of its latest launch."""
    from effitrain.engine.checkpoint import META, complete_checkpoints  # torch-free

    found = complete_checkpoints(run_dir / "checkpoints")
    if not found:
        return None
    try:
        meta = json.loads((found[-1][1] / META).read_text())
    except (OSError, ValueError):
        meta = {}
    if meta.get("world_size"):
        return int(meta["world_size"]), int(meta["micro_batch_size"]), int(meta["grad_accum"])
    world = 1
    for name in ("env.resume.json", "env.json"):
        try:
            world = int(json.loads((run_dir / name).read_text())["world_size"])
            break
        except (OSError, ValueError, KeyError):
            continue
    return world, int(cfg["train"]["micro_batch_size"]), int(cfg["train"]["grad_accum"])


def keep_global_batch(run_dir: Path, cfg: dict[str, Any], world_size: int) -> Optional[str]:
    """Elastic resume: with another number of processes than the checkpoint's, set ``train.grad_accum`` in ``cfg``
    so that micro_batch x grad_accum x world stays the saved global batch (the sampler then continues with exactly
    the same batches); returns the line that says so, or refuses when no whole grad_accum keeps it."""
    layout = saved_layout(run_dir, cfg)
    if layout is None or layout[0] == world_size:
        return None
    saved_world, micro, accum = layout
    stage = (cfg.get("parallelism") or {}).get("stage", 0)
    if stage == 3:
        raise ConfigError(f"resume: the run was saved by {saved_world} processes under ZeRO-3 and this launch has "
                          f"{world_size}; elastic resume supports ZeRO stages 0-2; resume with {saved_world} processes")
    global_batch = micro * accum * saved_world
    new_micro = int(cfg["train"]["micro_batch_size"])
    if global_batch % (new_micro * world_size):
        raise ConfigError(f"resume: the run was saved by {saved_world} processes with global batch {global_batch} "
                          f"(micro_batch_size {micro} x grad_accum {accum} x {saved_world}); with {world_size} "
                          f"processes no whole train.grad_accum keeps it; resume with a number of processes that "
                          f"divides {global_batch // new_micro}")
    new_accum = global_batch // (new_micro * world_size)
    cfg["train"]["grad_accum"] = new_accum
    return (f"resume: {saved_world} -> {world_size} processes: train.grad_accum {accum} -> {new_accum} keeps the "
            f"global batch at {global_batch} (micro_batch_size {new_micro})")


def _set(cfg: dict[str, Any], dotted: str, value: Any) -> None:
    node = cfg
    *parents, last = dotted.split(".")
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[last] = value


def check_resume_config(run_dir: Path, cfg: dict[str, Any], resume: Optional[str]) -> None:
    """For a composed config (group choices on the command line): ``resume=auto`` continues the run only if the
    result equals the stored config apart from :data:`RESUME_SAFE_KEYS`."""
    if resume != "auto" or not (run_dir / "config.yaml").is_file():
        return
    from effitrain.config.spec import OPTIONAL_GROUPS

    # a run stored before a group existed ran with that group's default option (objective: causal_lm)
    defaults = {g: dict(v) for g, v in OPTIONAL_GROUPS.items()}
    stored = {**defaults, **stored_config(run_dir)}
    old, new = flatten("", stored, {}), flatten("", {**defaults, **dict(cfg)}, {})
    changed = [k for k in sorted(set(old) | set(new))
               if old.get(k, "<unset>") != new.get(k, "<unset>") and not _safe(k)]
    if changed == ["train.grad_accum"] and _keeps_global_batch(run_dir, new):
        return  # an elastic resume with the grad_accum that keeps the global batch at this world size
    if not changed and not _keeps_global_batch(run_dir, new, same_world_ok=True):
        layout = saved_layout(run_dir, stored_config(run_dir))
        raise ConfigError(f"resume: the run was saved by {layout[0]} processes with global batch "
                          f"{layout[0] * layout[1] * layout[2]}, which this launch's world size changes; resume with "
                          f"`effitrain resume {run_dir}` (it sets train.grad_accum to keep the global batch)")
    if changed:
        shown = "; ".join(f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in changed[:4])
        more = f" (and {len(changed) - 4} more)" if len(changed) > 4 else ""
        raise ConfigError(f"resume: this launch's config differs from the run's in {shown}{more}; resume with "
                          f"`effitrain resume {run_dir}` (it remembers the run's recipe and overrides; see "
                          f"{run_dir / 'command.txt'}); only {_safe_keys_text()} may change")


def _keeps_global_batch(run_dir: Path, flat: dict[str, Any], same_world_ok: bool = False) -> bool:
    """Whether this launch (``WORLD_SIZE`` processes) has the global batch of the newest checkpoint; with
    ``same_world_ok``, a launch with the checkpoint's own world size (or no checkpoint) counts as keeping it."""
    layout = saved_layout(run_dir, stored_config(run_dir))
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if layout is None or layout[0] == world:
        return same_world_ok
    return flat["train.micro_batch_size"] * flat["train.grad_accum"] * world == layout[0] * layout[1] * layout[2]
