"""Multi-stage recipes: ``stages:``, an ordered list of config deltas, each trained as a whole run.

A stage entry names itself, says where its model comes from, may transform that model, and changes any run-level
keys of the recipe it sits in::

    stages:
      - name: small
        model: {num_layers: 2}                        # a delta: merged into the recipe's model block
        train: {max_steps: 100}
      - name: stacked
        init: previous                                # the final model of the stage before
        transform: {name: stack_layers, factor: 2}    # a registered model transform, applied between stages
        data: continue                                # the batches after the small stage's last one (default: fresh)
        objective: {name: distill, teacher: "@stage:small"}   # "@stage:NAME": that stage's final model folder

How a delta applies (this module turns ``(recipe config, stage)`` into the plain run config of the stage):

* a block group given as a string selects that option of the group, as ``model=llama_125m`` would;
* a mapping merges into the block, unless its ``name`` names another entry: then it replaces the block (the
  registry fills the defaults of the new entry);
* any other key (``train``, ``methods``, ``timeline``, ...) merges, lists and scalars replace;
* ``init: scratch`` builds the model block as configured; ``init: previous`` (the default after the first stage)
  and ``init: PATH`` load a folder written by ``save_pretrained`` (``model: {name: pretrained, path: ...}``), so a
  stage that starts from another stage's model sets no ``model`` keys itself; ``init: "@stage:NAME"`` starts from
  an earlier stage's final model (not the one just before: ft_transfer's second base continues the first).

Command-line overrides of dotted keys (``train.max_steps=3``, ``optimizer.lr=1e-3``) apply to every stage and win
over the stage deltas; ``stages.N.KEY=V`` changes one stage.  Torch-free: ``effitrain check`` validates every stage
before the first one starts.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

from effitrain.config.tree import BLOCK_GROUPS, config_root, group_options
from effitrain.registry import ConfigError, choices_text, did_you_mean

STAGE_REF = "@stage:"
STAGE_OWN_KEYS = ("name", "init", "transform", "sweep", "config_from", "data", "synthesis")
DATA_FRESH, DATA_CONTINUE = "fresh", "continue"
# Keys that belong to the pipeline as a whole, never to one stage.
PIPELINE_KEYS = ("run_dir", "resume", "overwrite", "stages", "recipe", "hydra", "plugins")
STAGES_DIR = "stages"
HANDOFF_DIR = "handoff"
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


@dataclass(frozen=True)
class StageDecl:
    """One entry of ``stages:``, checked."""
    index: int                       # 1-based position in the pipeline
    name: str
    init: str                        # 'scratch', 'previous' or a folder path
    transform: Optional[dict]        # {name: ..., params} of the `transform` group, or None
    delta: dict                      # the run-level keys the stage changes
    sweep: Optional[dict] = None     # {name: ..., params} of the `sweep` group: the stage trains member runs
    config_from: Optional[str] = None  # an earlier sweep stage whose concluded config delta this stage merges
    data: str = DATA_FRESH           # 'continue': the sampler starts after the previous stage's last batch
    synthesis: Optional[dict] = None  # the stage makes a dataset with a generator instead of training a model

    @property
    def leaves_model(self) -> bool:
        """A sweep stage leaves a concluded config and a synthesis stage a dataset; the others a final model."""
        return self.sweep is None and self.synthesis is None

    @property
    def dir_name(self) -> str:
        return f"{self.index:02d}-{self.name}"

    @property
    def inherits_model(self) -> bool:
        return self.init != "scratch"


def parse_stages(raw: Any) -> list[StageDecl]:
    """The ``stages:`` list, each entry's own keys checked (the deltas are validated as whole run configs later)."""
    if raw is None:
        return []
    if not isinstance(raw, (list, tuple)) or not raw:
        raise ConfigError(f"stages: expected a non-empty list of stages (each a mapping with a 'name'), got {raw!r}")
    stages: list[StageDecl] = []
    for i, entry in enumerate(raw):
        where = f"stages[{i}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where}: expected a mapping with a 'name' and the keys the stage changes, got "
                              f"{entry!r}")
        name = entry.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(f"{where}.name: expected a short lower-case name (letters, digits, '-', '_'), got "
                              f"{name!r}")
        if name in {s.name for s in stages}:
            raise ConfigError(f"{where}.name: '{name}' names two stages; stage names must differ")
        where = f"stages.{name}"
        synthesis = _synthesis_key(entry, where)
        # a synthesis stage trains no model: it starts from none (its generator names the model it samples from)
        init = entry.get("init", "scratch" if i == 0 or synthesis is not None else "previous")
        if not isinstance(init, str) or not init.strip():
            raise ConfigError(f"{where}.init: expected 'scratch', 'previous' or a model folder, got {init!r}")
        if i == 0 and init == "previous":
            raise ConfigError(f"{where}.init: the first stage has no previous stage; use 'scratch' or a model folder")
        if init.startswith(STAGE_REF):  # start from an earlier stage's final model, not the one just before
            _check_model_ref(init[len(STAGE_REF):], f"{where}.init", stages)
        transform = entry.get("transform")
        if transform is not None:
            if not isinstance(transform, Mapping) or "name" not in transform:
                raise ConfigError(f"{where}.transform: expected a mapping with a 'name' (valid: "
                                  f"{choices_text(_transform_names())}), got {transform!r}")
            if init == "scratch":
                raise ConfigError(f"{where}.transform: a stage with init: scratch has no model to transform; use "
                                  f"init: previous or a model folder")
            transform = dict(transform)
        delta = {k: copy.deepcopy(v) for k, v in entry.items() if k not in STAGE_OWN_KEYS}
        for key in delta:
            if key in PIPELINE_KEYS:
                raise ConfigError(f"{where}.{key}: belongs to the whole pipeline, not to one stage; set it at the "
                                  f"top level")
        if init != "scratch" and "model" in delta:
            raise ConfigError(f"{where}.model: a stage with init: {init} takes its model from there; set "
                              f"init: scratch to configure a new model")
        sweep, config_from = _sweep_keys(entry, where, init, transform, stages)
        data = _data_key(entry, where, sweep, stages)
        stages.append(StageDecl(i + 1, name, init, transform, delta, sweep, config_from, data, synthesis))
    for stage in stages:
        earlier = [s for s in stages if s.index < stage.index]
        # a delta's value or a transform's parameter (decoalesce_interpolate.reference) may name an earlier stage:
        # under `dataset` a synthesis stage (its dataset), anywhere else a stage that leaves a model
        for key, value in stage.delta.items():
            for ref in stage_refs(value):
                if key == "dataset":
                    _check_dataset_ref(ref, f"stages.{stage.name}.dataset", earlier)
                else:
                    _check_model_ref(ref, f"stages.{stage.name}", earlier)
        for ref in stage_refs(stage.transform or {}) + stage_refs(stage.synthesis or {}):
            _check_model_ref(ref, f"stages.{stage.name}", earlier)
    return stages


def _synthesis_key(entry: Mapping[str, Any], where: str) -> Optional[dict]:
    """``synthesis:`` (the stage makes a dataset with a generator; its keys are checked with the stage's run
    config in :func:`effitrain.config.spec.validate`).  It trains nothing, so the keys about a model are refused."""
    synthesis = entry.get("synthesis")
    if synthesis is None:
        return None
    if not isinstance(synthesis, Mapping):
        raise ConfigError(f"{where}.synthesis: expected a mapping with a rollout and a generator, got {synthesis!r}")
    for key in ("init", "transform", "sweep", "config_from", "data"):
        if key in entry:
            raise ConfigError(f"{where}.{key}: a synthesis stage makes a dataset and trains no model, so it takes "
                              f"no {key}; its generator names the model it samples from")
    return dict(synthesis)


def _check_dataset_ref(name: str, where: str, earlier: list[StageDecl]) -> None:
    """'@stage:NAME' under ``dataset`` must name an earlier synthesis stage (the dataset it made)."""
    made = [s.name for s in earlier if s.synthesis is not None]
    if name in made:
        return
    valid = f"earlier synthesis stages: {choices_text(made)}" if made else "no earlier stage makes a dataset"
    raise ConfigError(f"{where}: '{STAGE_REF}{name}' must name an earlier synthesis stage (whose dataset it "
                      f"trains on){did_you_mean(name, made)}; {valid}")


def _check_model_ref(name: str, where: str, earlier: list[StageDecl]) -> None:
    """'@stage:NAME' must name an earlier stage that leaves a model: a sweep stage trains member runs, measured and
    not kept, and concludes a config (config_from), not a model."""
    models = [s.name for s in earlier if s.leaves_model]
    if name in models:
        return
    valid = f"earlier stages: {choices_text(models)}" if models else "no earlier stage leaves a model"
    if name in {s.name for s in earlier if s.synthesis is not None}:
        raise ConfigError(f"{where}: '{STAGE_REF}{name}' names a synthesis stage, which leaves a dataset, not a "
                          f"model (train on it with dataset: '{STAGE_REF}{name}' or dataset.synthetic); {valid}")
    if name in {s.name for s in earlier}:
        raise ConfigError(f"{where}: '{STAGE_REF}{name}' names a sweep stage, which leaves no model (its members "
                          f"are measured, not kept; config_from: {name} takes the config it concludes); {valid}")
    raise ConfigError(f"{where}: '{STAGE_REF}{name}' must name an earlier stage{did_you_mean(name, models)}; {valid}")


def _sweep_keys(entry: Mapping[str, Any], where: str, init: str, transform: Any,
                stages: list[StageDecl]) -> tuple[Optional[dict], Optional[str]]:
    """``sweep:`` (this stage trains member runs and concludes a config) and ``config_from:`` (merge what an
    earlier sweep stage concluded), checked against the stages before."""
    sweep = entry.get("sweep")
    if sweep is not None:
        if not isinstance(sweep, Mapping) or "name" not in sweep:
            raise ConfigError(f"{where}.sweep: expected a mapping with a 'name' (valid: "
                              f"{choices_text(_group_names('sweep'))}), got {sweep!r}")
        if transform is not None:
            raise ConfigError(f"{where}.transform: a sweep stage trains its members from the stage's own model "
                              f"config; it takes no transform")
        sweep = dict(sweep)
    if stages and stages[-1].synthesis is not None and init == "previous":
        raise ConfigError(f"{where}.init: the previous stage '{stages[-1].name}' is a synthesis stage and leaves a "
                          f"dataset, not a model; set init: scratch (and dataset: '{STAGE_REF}{stages[-1].name}' to "
                          f"train on its data) or '{STAGE_REF}NAME' of a stage that trained a model")
    if stages and stages[-1].sweep is not None and init == "previous":
        raise ConfigError(f"{where}.init: the previous stage '{stages[-1].name}' is a sweep and leaves no model; "
                          f"set init: scratch or a model folder")
    config_from = entry.get("config_from")
    if config_from is not None:
        sweeps = [s.name for s in stages if s.sweep is not None]
        if config_from not in sweeps:
            raise ConfigError(f"{where}.config_from: '{config_from}' must name an earlier sweep stage"
                              f"{did_you_mean(str(config_from), sweeps)}; earlier sweep stages: "
                              f"{choices_text(sweeps) or 'none'}")
    return sweep, config_from


def _data_key(entry: Mapping[str, Any], where: str, sweep: Any, stages: list[StageDecl]) -> str:
    """``data: continue`` (the stage trains on the batches after the previous stage's last one: G_stack's grown
    model continues the small model's data stream) or ``fresh`` (the default: the sampler starts at its first
    batch, as a new run does)."""
    data = entry.get("data", DATA_FRESH)
    if data not in (DATA_FRESH, DATA_CONTINUE):
        raise ConfigError(f"{where}.data: expected '{DATA_FRESH}' (the stage's data starts at its first batch) or "
                          f"'{DATA_CONTINUE}' (after the previous stage's last batch), got {data!r}")
    if data == DATA_CONTINUE:
        if not stages:
            raise ConfigError(f"{where}.data: the first stage has no previous stage whose data it could continue; "
                              f"use data: {DATA_FRESH}")
        if stages[-1].synthesis is not None:
            raise ConfigError(f"{where}.data: the previous stage '{stages[-1].name}' makes a dataset and trains on "
                              f"nothing, so there is no data stream to continue; use data: {DATA_FRESH}")
        if sweep is not None or stages[-1].sweep is not None:
            raise ConfigError(f"{where}.data: a sweep stage trains member runs, so there is no single data stream "
                              f"to continue across it; use data: {DATA_FRESH}")
    return data


def _group_names(group: str) -> list[str]:
    from effitrain.config.blocks import load_builtin_blocks
    from effitrain.registry import REGISTRY

    load_builtin_blocks()
    return REGISTRY.names(group)


def _transform_names() -> list[str]:
    from effitrain.config.blocks import load_builtin_blocks
    from effitrain.registry import REGISTRY

    load_builtin_blocks()
    return REGISTRY.names("transform")


def stage_refs(node: Any) -> list[str]:
    if isinstance(node, str) and node.startswith(STAGE_REF):
        return [node[len(STAGE_REF):]]
    if isinstance(node, Mapping):
        return [r for v in node.values() for r in stage_refs(v)]
    if isinstance(node, (list, tuple)):
        return [r for v in node for r in stage_refs(v)]
    return []


def resolve_refs(node: Any, final_models: Mapping[str, str]) -> Any:
    """``@stage:NAME`` strings anywhere in ``node`` replaced by that stage's final-model folder."""
    if isinstance(node, str) and node.startswith(STAGE_REF):
        return final_models[node[len(STAGE_REF):]]
    if isinstance(node, Mapping):
        return {k: resolve_refs(v, final_models) for k, v in node.items()}
    if isinstance(node, list):
        return [resolve_refs(v, final_models) for v in node]
    return node


def base_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The recipe's config without its stages: what every stage's delta applies to."""
    return {k: copy.deepcopy(v) for k, v in cfg.items() if k != "stages"}


def _merge(into: dict[str, Any], delta: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in delta.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value) if not isinstance(value, Mapping) else _merge({}, value)
    return into


def _group_option(group: str, option: str, where: str) -> dict[str, Any]:
    import yaml

    options = group_options(group)
    if option not in options:
        raise ConfigError(f"{where}: unknown {group} option '{option}'{did_you_mean(option, options)}; valid: "
                          f"{choices_text(options)}")
    loaded = yaml.safe_load((config_root() / group / f"{option}.yaml").read_text()) or {}
    loaded.pop("defaults", None)
    return loaded


def stage_config(cfg: Mapping[str, Any], stage: StageDecl, *, init_model: Optional[str],
                 final_models: Mapping[str, str], concluded: Optional[Mapping[str, dict]] = None) -> dict[str, Any]:
    """The plain run config of ``stage``: the recipe's config with the stage's delta applied.

    ``init_model`` is the folder the stage starts from (for init previous/PATH; a placeholder when only checking),
    ``final_models`` maps earlier stage names to their final model folders (for ``@stage:NAME``), ``concluded``
    earlier sweep stages to the config delta they concluded (for ``config_from``; merged after the stage's own
    delta, so the keys the sweep chose win over the recipe's stand-ins; absent when only checking)."""
    run = base_config(cfg)
    delta = dict(stage.delta)
    if isinstance(delta.get("dataset"), str) and delta["dataset"].startswith(STAGE_REF):
        delta["dataset"] = synthesized_dataset_block(delta["dataset"], run.get("dataset"))
    _apply_delta(run, resolve_refs(delta, final_models), stage.name)
    if stage.config_from is not None and concluded and stage.config_from in concluded:
        _apply_delta(run, concluded[stage.config_from], stage.name)
    if stage.inherits_model:
        run["model"] = _inherited_model_block(run.get("model") or {}, init_model or stage.init)
    return run


#: the keys of every text dataset block (effitrain.config.blocks.dataset._Common) that a run's dataset keeps when it
#: trains on a synthesis stage's dataset alone: how rows are packed and held out, not where documents come from
_KEPT_DATASET_KEYS = ("seq_len", "eval_examples_per_domain", "num_proc", "packing", "min_piece_len")


def synthesized_dataset_block(ref: str, base: Any) -> dict[str, Any]:
    """``dataset: "@stage:NAME"``: the ``local`` block over that synthesis stage's jsonl file (its ``domain``
    column kept), with the packing keys of the recipe's own dataset block."""
    block: dict[str, Any] = {"name": "local", "path": ref, "domain_field": "domain", "text_field": "text"}
    if isinstance(base, Mapping):
        block.update({k: copy.deepcopy(base[k]) for k in _KEPT_DATASET_KEYS if k in base})
    return block


def _apply_delta(run: dict[str, Any], delta: Mapping[str, Any], stage_name: str) -> None:
    for key, value in delta.items():
        where = f"stages.{stage_name}.{key}"
        if key in BLOCK_GROUPS and isinstance(value, str):
            run[key] = _group_option(key, value, where)
        elif key in BLOCK_GROUPS and isinstance(value, Mapping):
            base_block = run.get(key) if isinstance(run.get(key), dict) else {}
            if "name" in value and value["name"] != base_block.get("name"):
                run[key] = _merge({}, value)  # another entry: its own defaults, not the old block's keys
            else:
                run[key] = _merge(copy.deepcopy(base_block), value)
        elif key in BLOCK_GROUPS:
            raise ConfigError(f"{where}: expected an option name or a mapping of the block's keys, got {value!r}")
        elif isinstance(value, Mapping) and isinstance(run.get(key), dict):
            run[key] = _merge(run[key], value)
        else:
            run[key] = copy.deepcopy(value)


def _inherited_model_block(configured: Mapping[str, Any], path: str) -> dict[str, Any]:
    """``model: pretrained`` at ``path``, keeping the switches that are not about the weights."""
    block: dict[str, Any] = {"name": "pretrained", "path": str(path)}
    for key in ("attn_implementation", "gradient_checkpointing"):
        if key in configured:
            block[key] = configured[key]
    return block


def placeholder_paths(stages: list[StageDecl]) -> tuple[dict[str, str], dict[str, str]]:
    """Stand-in folders for ``check``: the stages' models do not exist before the pipeline runs."""
    final = {s.name: f"<dataset of stage {s.name}>" if s.synthesis is not None else f"<final model of stage {s.name}>"
             for s in stages}
    init = {}
    for i, s in enumerate(stages):
        if s.init == "previous":
            init[s.name] = final[stages[i - 1].name]
        elif s.init.startswith(STAGE_REF):
            init[s.name] = final[s.init[len(STAGE_REF):]]
        elif s.init != "scratch":
            init[s.name] = s.init
    return init, final


def propagate_overrides(cfg: dict[str, Any], overrides: list[Any]) -> dict[str, Any]:
    """Make the command line's dotted overrides win over the stage deltas too (``train.max_steps=3`` shortens every
    stage).  ``overrides`` are Hydra's parsed overrides; the values are taken from the composed ``cfg``."""
    stages = cfg.get("stages")
    if not isinstance(stages, list):
        return cfg
    # `stages.1.train.max_steps=50` names one stage's key: a general override of the same key does not touch it
    explicit = set()
    for override in overrides:
        parts = str(override.key_or_group).split(".")
        if parts[0] == "stages" and len(parts) > 2 and parts[1].isdigit():
            explicit.add((int(parts[1]), ".".join(parts[2:])))
    for override in overrides:
        key = str(override.key_or_group)
        if override.is_delete() or "." not in key or key.split(".")[0] in PIPELINE_KEYS:
            continue
        value, found = _get(cfg, key)
        if not found:
            continue
        top, rest = key.split(".", 1)
        for index, entry in enumerate(stages):
            if any((index, k) in explicit for k in _prefixes(key)):
                continue
            section = entry.get(top) if isinstance(entry, dict) else None
            if not isinstance(section, dict):
                continue  # the stage does not change this part: the base already carries the override
            if top in BLOCK_GROUPS and not _block_takes(top, section, cfg.get(top), rest):
                continue
            node = section
            *parents, leaf = rest.split(".")
            for part in parents:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    break
            else:
                node[leaf] = copy.deepcopy(value)
    return cfg


def _block_takes(group: str, section: Mapping[str, Any], base_block: Any, rest: str) -> bool:
    """Does the stage's version of a block have the overridden key (another entry may not)?"""
    import dataclasses

    from effitrain.config.blocks import load_builtin_blocks
    from effitrain.registry import REGISTRY

    name = section.get("name") or (base_block or {}).get("name")
    if name == (base_block or {}).get("name"):
        return True
    load_builtin_blocks()
    if name not in REGISTRY.names(group):
        return False
    return rest.split(".")[0] in {f.name for f in dataclasses.fields(REGISTRY.get(group, name).params)}


def _prefixes(dotted: str) -> list[str]:
    parts = dotted.split(".")
    return [".".join(parts[:n]) for n in range(1, len(parts) + 1)]


def _get(cfg: Mapping[str, Any], dotted: str) -> tuple[Any, bool]:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None, False
        node = node[part]
    return node, True
