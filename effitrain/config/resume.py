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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from effitrain.config.compose import flatten, parse_overrides
from effitrain.config.tree import RECIPE_GROUP
from effitrain.registry import ConfigError
from effitrain.run_layout import META, RECIPES_FILE, complete_checkpoints

# train.max_steps may change: the schedule then follows the new horizon from the resumed step on, and the run says so.
RESUME_SAFE_KEYS = ("train.max_steps", "train.eval_every", "train.eval_at_start", "train.eval_batches",
                    "train.save_every", "train.keep_checkpoints", "train.log_every", "train.max_bad_steps",
                    "train.save_final_model", "train.save_every_minutes", "logger.", "eval.", "methods.samples.",
                    "run_dir", "resume", "overwrite")


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
    from effitrain.config.tree import BLOCK_GROUPS

    for override in parse_overrides(overrides):
        key = override.key_or_group
        if key == RECIPE_GROUP or key in BLOCK_GROUPS or override.is_delete():
            return False
    return True


def remembered_config(run_dir: Path, overrides: list[str]) -> tuple[dict[str, Any], Optional[list[dict]]]:
    """The run's stored config with the command line's safe overrides applied, set to resume in ``run_dir``."""
    from effitrain.config.tree import BLOCK_GROUPS

    cfg = stored_config(run_dir)
    stored = flatten("", cfg, {})
    recipes = stored_recipes(run_dir, cfg)
    changed = {}
    for override in parse_overrides(overrides):
        key, value = override.key_or_group, override.value()
        if key in ("run_dir", "resume", "overwrite"):
            continue
        if override.is_sweep_override():
            raise ConfigError(f"{key}: a resumed run takes one value, not a sweep")
        if key == RECIPE_GROUP:  # naming the run's own recipe again is fine; another one is a different run
            old, new = _recipe_names(recipes, cfg), [value] if isinstance(value, str) else list(value or [])
            if old != new:
                changed[key] = (_names_text(old), _names_text(new))
            continue
        if key in BLOCK_GROUPS:  # a block option (optimizer=adamw): compared with the option the run used
            old = (cfg.get(key) or {}).get("name", "<unset>") if isinstance(cfg.get(key), dict) else "<unset>"
            if old != value:
                changed[key] = (repr(old), repr(value))
            continue
        before = stored.get(key, _nested(cfg, key))  # a list or mapping (`+stages=[...]`) is stored nested
        if not _safe(key) and not same_value(before, value):
            changed[key] = (repr(before), repr(value))
            continue
        _set(cfg, key, value)
    if changed:
        shown = "; ".join(f"{k}: {a} -> {b}" for k, (a, b) in list(changed.items())[:4])
        raise ConfigError(f"resume: {shown} cannot change when a run resumes (it changes what the run computes); "
                          f"only {_safe_keys_text()} may; start a new run_dir for a different configuration")
    cfg.update(run_dir=str(run_dir), resume="auto", overwrite=False)
    from effitrain.config.stages import propagate_overrides

    propagate_overrides(cfg, parse_overrides(overrides))  # e.g. train.max_steps reaches every stage's delta
    return cfg, recipes


def saved_layout(run_dir: Path, cfg: dict[str, Any]) -> Optional[tuple[int, int, int]]:
    """(world size, micro batch, grad accum) of the newest complete checkpoint's launch, from its meta.json; for a
    checkpoint from before that record, the run's stored config and the world size of its latest launch."""
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


def _nested(cfg: Any, dotted: str) -> Any:
    """The value at a dotted key of a nested config (list items by index), or '<unset>'."""
    node = cfg
    for part in dotted.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return "<unset>"
    return node


def _set(cfg: dict[str, Any], dotted: str, value: Any) -> None:
    node = cfg
    *parents, last = dotted.split(".")
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[last] = value


def same_value(old: Any, new: Any) -> bool:
    """Equal, or two spellings of one path: a run started as ``run_dir=outputs/r2`` stored its stages' model paths
    absolute (Hydra hands the task an absolute run directory), and ``effitrain resume outputs/r2`` from the same
    folder spells them relative."""
    if old == new:
        return True
    if isinstance(old, str) and isinstance(new, str) and _looks_like_path(old) and _looks_like_path(new):
        return Path(old).expanduser().absolute().resolve() == Path(new).expanduser().absolute().resolve()
    return False


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.startswith(("~", "."))


def _recipe_names(recipes: Optional[list[Any]], cfg: dict[str, Any]) -> list[str]:
    """The names of a run's recipes, from its recipe list (``recipes.yaml``, a composition's recipe blocks or a
    spec's) or, for a run stored before that list, from the config's own ``recipe:`` block."""
    if recipes is not None:
        return [str(r.get("name", "?")) if isinstance(r, dict) else r.name for r in recipes]
    block = cfg.get("recipe")
    return [block["name"]] if isinstance(block, dict) and block.get("name") else []


def check_resume_config(run_dir: Path, cfg: dict[str, Any], resume: Optional[str],
                        recipes: Optional[list[Any]] = None) -> None:
    """For a composed config (group choices on the command line): ``resume=auto`` continues the run only if the
    result equals the stored config apart from :data:`RESUME_SAFE_KEYS`.  The recipes' own description (the
    ``recipe:`` block: name, paper, claim) is not a setting: a different recipe is named once, by name, and only the
    settings it changes are listed."""
    if resume != "auto" or not (run_dir / "config.yaml").is_file():
        return
    from effitrain.config.tree import OPTIONAL_GROUPS

    # a run stored before a group existed ran with that group's default option (objective: causal_lm)
    defaults = {g: dict(v) for g, v in OPTIONAL_GROUPS.items()}
    stored_cfg = stored_config(run_dir)
    stored = {**defaults, **stored_cfg}
    old, new = flatten("", stored, {}), flatten("", {**defaults, **dict(cfg)}, {})
    changed = [k for k in sorted(set(old) | set(new))
               if not same_value(old.get(k, "<unset>"), new.get(k, "<unset>")) and not _safe(k)
               and not _recipe_description(k)]
    old_recipes = _recipe_names(stored_recipes(run_dir, stored_cfg), stored_cfg)
    new_recipes = _recipe_names(recipes, dict(cfg))
    if changed == ["train.grad_accum"] and _keeps_global_batch(run_dir, new):
        return  # an elastic resume with the grad_accum that keeps the global batch at this world size
    if not changed and old_recipes == new_recipes and not _keeps_global_batch(run_dir, new, same_world_ok=True):
        layout = saved_layout(run_dir, stored_config(run_dir))
        raise ConfigError(f"resume: the run was saved by {layout[0]} processes with global batch "
                          f"{layout[0] * layout[1] * layout[2]}, which this launch's world size changes; resume with "
                          f"`effitrain resume {run_dir}` (it sets train.grad_accum to keep the global batch)")
    if changed or old_recipes != new_recipes:
        recipe = (f"the run's recipe is {_names_text(old_recipes)} and this launch's is {_names_text(new_recipes)}; "
                  if old_recipes != new_recipes else "")
        shown = "; ".join(f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in changed[:4])
        more = f" (and {len(changed) - 4} more)" if len(changed) > 4 else ""
        keys = f"this launch's config differs from the run's in {shown}{more}" if changed else \
            "no setting differs"
        resumable = _pipeline_of(run_dir) or run_dir  # a stage is resumed through its pipeline
        raise ConfigError(f"resume: {recipe}{keys}; resume with "
                          f"`effitrain resume {resumable}` (it remembers the run's recipe and overrides; see "
                          f"{resumable / 'command.txt'}); only {_safe_keys_text()} may change")


def _pipeline_of(run_dir: Path) -> Optional[Path]:
    """The pipeline folder a stage's folder (``PIPELINE/stages/NN-name``) belongs to, or None."""
    from effitrain.config.stages import STAGES_DIR

    pipeline = run_dir.parent.parent
    if run_dir.parent.name == STAGES_DIR and (pipeline / "config.yaml").is_file():
        return pipeline
    return None


def _recipe_description(key: str) -> bool:
    """``recipe.name``, ``recipe.paper``, ... describe the recipe; its settings are the other keys."""
    return key == "recipe" or key.startswith("recipe.")


def _names_text(names: list[str]) -> str:
    return "+".join(f"'{n}'" for n in names) if names else "none"


def _keeps_global_batch(run_dir: Path, flat: dict[str, Any], same_world_ok: bool = False) -> bool:
    """Whether this launch (``WORLD_SIZE`` processes) has the global batch of the newest checkpoint; with
    ``same_world_ok``, a launch with the checkpoint's own world size (or no checkpoint) counts as keeping it."""
    layout = saved_layout(run_dir, stored_config(run_dir))
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if layout is None or layout[0] == world:
        return same_world_ok
    return flat["train.micro_batch_size"] * flat["train.grad_accum"] * world == layout[0] * layout[1] * layout[2]


@dataclass
class Finished:
    """A run that ``resume=auto`` has nothing left to do for: its stored summary and the line that says so."""
    summary: dict[str, Any]
    line: str


def nothing_to_resume(run_dir: Path, spec: Any) -> Optional[Finished]:
    """What ``resume=auto`` of ``run_dir`` with the validated ``spec`` would do, decided before anything is written.

    Refuses a horizon below the step the run (or the stage that was running) has reached: the run continues from
    that checkpoint and would train past its own ``train.max_steps``.  Returns the run's summary when it finished at
    or beyond the horizon asked for and its newest checkpoint is there too (a finished stage of a pipeline is never
    trained further, so a finished pipeline is finished at any horizon); None when there is training left."""
    if spec.stages:
        return _pipeline_finished(run_dir, spec)
    _check_horizon(run_dir, spec.train.max_steps)
    summary = finished_summary(run_dir)
    if summary is None or int(summary.get("steps") or 0) < spec.train.max_steps:
        return None
    newest = _newest_checkpoint_step(run_dir)
    if newest is not None and newest < spec.train.max_steps:
        return None  # its last checkpoints are gone: resume continues from the newest one left
    return Finished(summary, f"resume: {run_dir} finished at step {summary['steps']} (train.max_steps="
                             f"{spec.train.max_steps}); nothing was changed; give a larger train.max_steps to "
                             f"train it further")


def _pipeline_finished(run_dir: Path, spec: Any) -> Optional[Finished]:
    from effitrain.config.stages import STAGES_DIR

    unfinished = []
    for stage, stage_spec in zip(spec.stages, spec.stage_specs):
        stage_dir = run_dir / STAGES_DIR / stage.dir_name
        if finished_summary(stage_dir) is None:
            unfinished.append(stage.name)
            if stage.sweep is None:
                _check_horizon(stage_dir, stage_spec.train.max_steps, f" (stage '{stage.name}')")
    summary = finished_summary(run_dir)
    if summary is None or unfinished:  # e.g. a stage's record removed to train it again
        return None
    return Finished(summary, f"resume: {run_dir} finished all {len(spec.stages)} stages; nothing was changed (a "
                             f"finished stage is not trained further: start a new run_dir to train longer)")


def _newest_checkpoint_step(run_dir: Path) -> Optional[int]:
    found = complete_checkpoints(run_dir / "checkpoints")
    return found[-1][0] if found else None


def _check_horizon(run_dir: Path, max_steps: int, stage: str = "") -> None:
    found = complete_checkpoints(run_dir / "checkpoints")
    if found and max_steps < found[-1][0]:
        step, path = found[-1]
        raise ConfigError(f"resume: train.max_steps={max_steps}{stage} is below step {step}, where the run's newest "
                          f"checkpoint is ({path}); a resumed run continues from there: give train.max_steps={step} "
                          f"or more, or start a new run_dir")


def finished_summary(run_dir: Path) -> Optional[dict[str, Any]]:
    """The run's (or stage's, or sweep member's) ``summary.json`` if it says the run finished; else None."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and summary.get("finished") else None
