"""The run-level schema and :func:`validate`, which turns a composed config into a typed :class:`RunSpec`.

Validation is complete before anything is built: every block's name and parameters, the run-level keys, the
methods, the plugins and the compatibility rules.  It imports neither torch nor deepspeed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from effitrain.config.blocks import load_builtin_blocks
from effitrain.config.tree import BLOCK_GROUPS, OPTIONAL_GROUPS
from effitrain.registry import (REGISTRY, Block, ConfigError, choices_text, did_you_mean, load_plugins, param,
                                parse_params)



@dataclass
class TrainParams:
    max_steps: int = param(200, ge=1, help="optimizer steps")
    micro_batch_size: int = param(8, ge=1, help="sequences per process per forward pass")
    grad_accum: int = param(1, ge=1, help="micro-batches per optimizer step")
    global_batch_size: Optional[int] = param(None, ge=1, help="if set, must equal micro x accum x world size")
    seed: int = 0
    eval_every: int = param(50, ge=0, help="steps between evaluations (0: only at the start and the end)")
    eval_at_start: Optional[bool] = param(None, help="evaluate at step 0 too (the curves' starting point); null: "
                                          "unless the run is shorter than eval_every (a smoke test evaluates once, "
                                          "at the end)")
    eval_batches: int = param(4, ge=1, help="micro-batches per domain in each evaluation")
    save_every: int = param(0, ge=0, help="steps between checkpoints (0: only at the end)")
    save_every_minutes: float = param(30.0, ge=0, help="also save when this many minutes passed since the last "
                                      "save, so a crash loses at most that much (0: off)")
    keep_checkpoints: int = param(2, ge=1, help="complete checkpoints kept on disk")
    log_every: int = param(10, ge=1, help="steps between log lines (the only host syncs of the loop)")
    clip_grad_norm: float = param(1.0, ge=0, help="0 disables clipping")
    max_bad_steps: int = param(5, ge=1, help="stop after this many non-finite steps in a row")
    save_final_model: bool = param(True, help="write the final model with save_pretrained")
    continue_data_from: Optional[str] = param(None, help="a run directory: start the data sampler where its newest "
                                              "checkpoint left it, so this run trains on the batches that run would "
                                              "have seen next (a stage with `data: continue` sets it to the stage "
                                              "before); a resume of this run continues from its own checkpoint")

    def evaluates_at_start(self) -> bool:
        """Whether the run evaluates at step 0 as well as at its intervals and at the end.  A run shorter than its
        evaluation interval (``effitrain train.max_steps=1``, a smoke test) evaluates once, at the end: its step-0
        evaluation was most of a short run's own time and adds no point a curve needs.  ``eval_at_start`` decides
        either way; ``eval_every: 0`` keeps its meaning, the start and the end."""
        if self.eval_at_start is not None:
            return self.eval_at_start
        return not 0 < self.max_steps < self.eval_every


@dataclass
class RecipeInfo:
    """The ``recipe:`` block at the top of every recipe file: what the method is and where it comes from."""
    name: str
    paper: str
    arxiv: Optional[str] = None
    claim: str = ""
    requires: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    notes: str = ""


@dataclass
class RunSpec:
    blocks: dict[str, Block]
    methods: dict[str, Block]
    train: TrainParams
    run_dir: Optional[str]
    resume: Optional[str]
    overwrite: bool
    plugins: list[str]
    recipes: list[RecipeInfo]
    #: a multi-stage recipe's stages, each with its own validated spec (empty for a single run)
    stages: list[Any] = field(default_factory=list)
    stage_specs: list["RunSpec"] = field(default_factory=list)
    timeline: Any = None           # effitrain.timeline.TimelineSpec (declared units; resolved per run)
    sweep: Optional[Block] = None  # a sweep stage's validated `sweep:` block (its members train this spec)
    concluded_by: Optional[Block] = None  # the sweep whose concluded config a `config_from` stage merges
    start_shape: Any = None        # a stage's inherited model (effitrain.config.stage_shapes.ModelShape), or None
    data: Any = None               # the `data:` section (effitrain.config.blocks.data_engine.DataParams)
    synthesis: Any = None          # a synthesis stage's validated `synthesis:` (config.blocks.synthesis)

    def block(self, group: str) -> Block:
        return self.blocks[group]


ROOT_KEYS = {"train", "run_dir", "resume", "overwrite", "plugins", "methods", "recipe", "hydra", "stages",
             "timeline", "data", *BLOCK_GROUPS}


def validate(cfg: Mapping[str, Any], recipes: Optional[list[Mapping[str, Any]]] = None, *,
             rules: bool = True) -> RunSpec:
    """Validate a composed config (a resolved mapping).  ``recipes`` are the ``recipe:`` blocks of the stacked
    recipe files, in order; by default the single ``recipe`` key of ``cfg`` is used.  A config with ``stages:`` is
    validated as its base (the recipe without stages) and as every stage's resolved run config.  ``rules=False``
    leaves the compatibility rules to the caller (docs/compatibility.md evaluates every one of them)."""
    if cfg.get("stages") is not None:
        return _validate_stages(cfg, recipes, rules)
    load_builtin_blocks()
    plugins = cfg.get("plugins") or []
    if not isinstance(plugins, (list, tuple)) or not all(isinstance(p, str) for p in plugins):
        raise ConfigError(f"plugins: expected a list of module names, got {plugins!r}")
    load_plugins(plugins)

    for key in cfg:
        if key not in ROOT_KEYS:
            shown = ROOT_KEYS - {"hydra"}
            raise ConfigError(f"{key}: unknown key{did_you_mean(key, shown)}; valid: {choices_text(shown)}")
    blocks = {}
    for group in BLOCK_GROUPS:
        if group not in cfg and group in OPTIONAL_GROUPS:
            blocks[group] = REGISTRY.parse(group, dict(OPTIONAL_GROUPS[group]), group)
            continue
        if group not in cfg:
            raise ConfigError(f"{group}: required block is missing; valid: {choices_text(REGISTRY.names(group))}")
        blocks[group] = REGISTRY.parse(group, cfg[group], group)

    methods_cfg = cfg.get("methods") or {}
    if not isinstance(methods_cfg, Mapping):
        raise ConfigError(f"methods: expected a mapping of method name to its parameters, got {methods_cfg!r}")
    methods = {}
    for name, params in methods_cfg.items():
        if params is None:  # `methods: {lisa: null}` switches a method off without deleting recipe lines
            continue
        if not isinstance(params, Mapping):
            raise ConfigError(f"methods.{name}: expected a mapping of the method's parameters (or null to switch "
                              f"it off), got {params!r}")
        body = dict(params)
        body.setdefault("name", name)
        methods[name] = REGISTRY.parse("method", body, f"methods.{name}")

    train_cfg = cfg.get("train") or {}
    if not isinstance(train_cfg, Mapping):
        raise ConfigError(f"train: expected a mapping of run settings (e.g. train.max_steps=100), got {train_cfg!r}")
    train = parse_params(TrainParams, train_cfg, "train")
    resume = cfg.get("resume")
    if resume is not None and not isinstance(resume, str):
        raise ConfigError(f"resume: expected 'auto' or a checkpoint path, got {resume!r}")
    overwrite = cfg.get("overwrite", False)
    if not isinstance(overwrite, bool):
        raise ConfigError(f"overwrite: expected true or false, got {overwrite!r}")
    run_dir = cfg.get("run_dir")
    if run_dir is not None and not isinstance(run_dir, str):
        raise ConfigError(f"run_dir: expected a path, got {run_dir!r}")

    if recipes is None:
        recipes = [cfg["recipe"]] if cfg.get("recipe") else []
    for i, r in enumerate(recipes):
        if not isinstance(r, Mapping):
            raise ConfigError(f"recipe[{i}]: the recipe's 'recipe:' block must be a mapping (name, paper, ...), "
                              f"got {r!r}")
    infos = [parse_params(RecipeInfo, r, f"recipe[{r.get('name', i)}]") for i, r in enumerate(recipes)]

    timeline = _timeline(cfg.get("timeline"), blocks)
    spec = RunSpec(blocks=blocks, methods=methods, train=train, run_dir=run_dir, resume=resume, overwrite=overwrite,
                   plugins=list(plugins), recipes=infos, timeline=timeline, data=_data_section(cfg.get("data")))
    if rules:
        from effitrain.config.rules import check_rules
        check_rules(spec)
    return spec


def _data_section(data_cfg: Any) -> Any:
    """The ``data:`` section (where the data stage runs: effitrain.config.blocks.data_engine); absent = defaults."""
    from effitrain.config.blocks.data_engine import DataParams

    if data_cfg is None:
        return DataParams()
    if not isinstance(data_cfg, Mapping):
        raise ConfigError(f"data: expected a mapping (e.g. data.executor=local data.tasks=4), got {data_cfg!r}")
    params = parse_params(DataParams, data_cfg, "data")
    params.validate("data")
    return params


def _validate_stages(cfg: Mapping[str, Any], recipes: Optional[list[Mapping[str, Any]]], rules: bool = True) -> RunSpec:
    """The base and every stage validated, each stage against the model the stages before it will hand it
    (:mod:`effitrain.config.stage_shapes`), so a later stage's mistake is refused before the first stage trains."""
    from effitrain.config import stage_shapes
    from effitrain.config.stages import (DATA_CONTINUE, STAGE_REF, base_config, parse_stages, placeholder_paths,
                                         stage_config)

    stages = parse_stages(cfg.get("stages"))
    spec = validate(base_config(cfg), recipes, rules=rules)
    init_models, final_models = placeholder_paths(stages)
    shapes: dict[str, Any] = {}  # stage name -> the shape of its final model
    run_cfgs: list[dict[str, Any]] = []
    for i, stage in enumerate(stages):
        start = _start_shape(stage, stages[i - 1] if i else None, shapes)
        if stage.transform is not None:
            transform = parse_transform(stage)
            where = f"stages.{stage.name}.transform"
            # a transform may check the model it will receive where that model is built from config (the previous
            # stage's spec), so that e.g. odd sizes are refused before the first stage trains
            check = getattr(transform.params, "check_source", None)
            if check is not None and stage.init == "previous" and spec.stage_specs:
                check(spec.stage_specs[-1], where)
            start = stage_shapes.transformed_shape(transform, start, where)
            # ... or the folder it starts from, when that is a user's folder that exists now (torch-free)
            check_folder = getattr(transform.params, "check_init_folder", None)
            if check_folder is not None and stage.init not in ("scratch", "previous") \
                    and not stage.init.startswith(STAGE_REF):
                check_folder(stage.init, where)
        elif start is not None:
            stage_shapes.check_inherited(start, stage.name)
        run_cfg = stage_config(cfg, stage, init_model=init_models.get(stage.name), final_models=final_models)
        try:
            one = validate(run_cfg, recipes, rules=False)
            one.start_shape = start  # what the rules know of an inherited model (its positions)
            if rules:
                from effitrain.config.rules import check_rules
                check_rules(one)
        except ConfigError as exc:
            raise ConfigError(f"stages.{stage.name}: {exc}") from None
        if stage.data == DATA_CONTINUE:
            _check_continued_data(run_cfgs[-1], run_cfg, stages[i - 1].name, stage.name)
        run_cfgs.append(run_cfg)
        spec.stage_specs.append(one)
        if stage.config_from is not None:
            one.concluded_by = next(s.sweep for s, d in zip(spec.stage_specs, stages) if d.name == stage.config_from)
        if stage.synthesis is not None:  # its keys, with '@stage:NAME' models as the placeholders of check
            from effitrain.config.blocks.synthesis import parse_synthesis
            from effitrain.config.stages import resolve_refs

            one.synthesis = parse_synthesis(resolve_refs(stage.synthesis, final_models),
                                            f"stages.{stage.name}.synthesis")
            continue  # it leaves a dataset: no model shape for the stages after it
        if stage.sweep is None:
            built = start if start is not None else stage_shapes.built_shape(one, f"stage '{stage.name}'s model")
            shapes[stage.name] = stage_shapes.trained_shape(built, one, stage.name)
        if stage.sweep is not None:  # a sweep's own keys checked against its stage's run (e.g. a known domain)
            spec.stage_specs[-1].sweep = parse_sweep(stage)
            check = getattr(spec.stage_specs[-1].sweep.params, "check_stage", None)
            if check is not None:
                check(spec.stage_specs[-1], f"stages.{stage.name}.sweep")
    spec.stages = stages
    return spec


#: what must be equal for a stage to continue the previous stage's data stream: the same packed rows, drawn by the
#: same sampler in the same global batches
_DATA_KEYS = ("dataset", "selection", "curriculum", "train.micro_batch_size", "train.grad_accum", "train.seed")


def _check_continued_data(previous: dict[str, Any], this: dict[str, Any], previous_name: str, name: str) -> None:
    """``data: continue`` starts the sampler where the previous stage's stopped; refused here, before anything
    trains, when the two stages would pack or draw other rows (the run itself would refuse only after the previous
    stage trained)."""
    for key in _DATA_KEYS:
        mine, theirs = _flat(_dotted(this, key), key), _flat(_dotted(previous, key), key)
        for leaf in sorted(set(mine) | set(theirs)):
            if mine.get(leaf) != theirs.get(leaf):
                raise ConfigError(f"stages.{name}.data: 'continue' needs the data stream of stage '{previous_name}', "
                                  f"but {leaf} is {mine.get(leaf)!r} here and {theirs.get(leaf)!r} there; make them "
                                  f"equal, or use data: fresh")


def _dotted(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = cfg.get(part) if isinstance(cfg, dict) else None
    return cfg


def _flat(node: Any, prefix: str) -> dict[str, Any]:
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _flat(value, f"{prefix}.{key}").items()}
    return {prefix: node}


def _start_shape(stage: Any, previous: Any, shapes: dict[str, Any]) -> Any:
    """The shape of the model a stage starts from (None: the stage builds its own from its config)."""
    from effitrain.config.stage_shapes import folder_shape
    from effitrain.config.stages import STAGE_REF

    if stage.init == "previous":
        return shapes[previous.name]
    if stage.init.startswith(STAGE_REF):
        return shapes[stage.init[len(STAGE_REF):]]
    return None if stage.init == "scratch" else folder_shape(stage.init, f"the model at {stage.init}")


def parse_sweep(stage: Any) -> Block:
    """The validated ``sweep:`` block of a stage (the ``sweep`` registry group)."""
    load_builtin_blocks()
    return REGISTRY.parse("sweep", stage.sweep, f"stages.{stage.name}.sweep")


def parse_transform(stage: Any) -> Block:
    """The validated ``transform:`` block of a stage (the ``transform`` registry group)."""
    load_builtin_blocks()
    return REGISTRY.parse("transform", stage.transform, f"stages.{stage.name}.transform")


def _timeline(raw: Any, blocks: dict[str, Block]) -> Any:
    """The ``timeline:`` key, checked against what is known without reading data: the packed length, the demo
    corpus's domains (other sources' domains are checked when the mixture sampler is built), and the blocks that
    read each quantity."""
    from effitrain.timeline import check_readers, parse_timeline

    dataset = blocks["dataset"]
    domains = getattr(dataset.params, "domains", None)
    if domains is None and dataset.name == "demo":
        from effitrain.data.demo import DEMO_DOMAINS  # standard library only
        domains = list(DEMO_DOMAINS)
    if domains is not None and getattr(dataset.params, "procedural_docs", 0):
        domains = [*domains, "procedural"]  # generated documents (dataset.procedural_docs) join as this domain
    synthetic = getattr(dataset.params, "synthetic", None)
    if domains is not None and synthetic:  # model-made documents bring their own domains, read where they exist
        from effitrain.data.synthetic import file_domains  # standard library only

        made = file_domains(synthetic)
        # an earlier stage writes them: the mixture's domains are checked when the sampler is built
        domains = None if made is None else [*domains, *made]
    timeline = parse_timeline(raw, dataset_seq_len=getattr(dataset.params, "seq_len", None), domains=domains)
    check_readers(timeline, curriculum=blocks["curriculum"].name, scheduler=blocks["scheduler"].name,
                  objective=blocks["objective"].name)
    check_timeline = getattr(blocks["objective"].params, "check_timeline", None)
    if check_timeline is not None:  # objective: mixed, whose component names the weights must use
        check_timeline(timeline)
    return timeline
