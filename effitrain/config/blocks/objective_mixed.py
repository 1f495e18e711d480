"""``objective: mixed``: several registered objectives in one stage, each on its own data stream, summed with weights
that follow a schedule (the timeline's ``objective_weights``, a constant, or "every k-th step") or a registered
controller (the ``mix_controller`` group: ``relift``, ``sasr``) that sets them from what happens during the run.

A component is ``{objective: {name: ..., ...}, data: ..., weight: w, every: k}``:

* ``objective``: any registered objective block but ``mixed`` itself (sft, grpo, causal_lm, distill, ...);
* ``data``: ``stage`` (the stage's own batches: its dataset and curriculum), a mapping of keys that override the
  stage's dataset block for a stream of this component's own (e.g. ``{format: chat}`` beside a GRPO stage on
  ``format: prompts``), or ``buffer`` (rows a controller collects during the run: relift's failed questions);
* ``weight`` (1.0) and ``every`` (null): the component counts with ``weight`` on every step, or only on every
  ``every``-th step (steps k-1, 2k-1, ...: "every k steps an SFT step").

Torch-free: ``effitrain check`` and ``effitrain plan`` read it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from effitrain.config.rules import rule
from effitrain.registry import ConfigError, REGISTRY, _is_mapping, choices_text, did_you_mean, param, register

DATA_KINDS = ("stage", "buffer")
_COMPONENT_KEYS = ("objective", "data", "weight", "every")


@dataclass
class Component:
    name: str
    objective: Any          # the parsed objective block
    data: Any               # "stage" | "buffer" | {dataset key: value}
    weight: float = 1.0
    every: Optional[int] = None

    def scheduled_weight(self, step: int, timeline_weights: Optional[dict] = None) -> float:
        """The weight the schedule gives this component at ``step`` (a controller may override it)."""
        weight = self.weight if timeline_weights is None else float(timeline_weights.get(self.name, 0.0))
        if self.every is not None and step % self.every != self.every - 1:
            return 0.0
        return weight


def parse_component(name: str, raw: Any, path: str) -> Component:
    if not _is_mapping(raw):
        raise ConfigError(f"{path}: expected a mapping {{objective: {{name: ...}}, data: stage, weight: 1.0}}, got "
                          f"{raw!r}")
    for key in raw:
        if key not in _COMPONENT_KEYS:
            raise ConfigError(f"{path}.{key}: unknown key{did_you_mean(str(key), _COMPONENT_KEYS)}; valid keys: "
                              f"{choices_text(_COMPONENT_KEYS)}")
    if "objective" not in raw:
        raise ConfigError(f"{path}.objective: required, e.g. {{name: sft}}; valid: "
                          f"{choices_text(n for n in REGISTRY.names('objective') if n != 'mixed')}")
    body = raw["objective"]
    if isinstance(body, str):
        body = {"name": body}
    if _is_mapping(body) and body.get("name") == "mixed":
        raise ConfigError(f"{path}.objective: a mixed objective cannot be a component of another; list its "
                          f"components here instead")
    objective = REGISTRY.parse("objective", dict(body), f"{path}.objective")
    data = raw.get("data", "stage")
    if _is_mapping(data):
        data = dict(data)
        if "name" in data:
            raise ConfigError(f"{path}.data.name: a component's stream overrides keys of the stage's dataset block "
                              f"(format, domain_by, ...); another dataset source is not supported yet")
    elif data not in DATA_KINDS:
        raise ConfigError(f"{path}.data: unknown value {data!r}{did_you_mean(str(data), DATA_KINDS)}; valid: stage "
                          f"(the stage's batches), buffer (rows a controller collects), or a mapping of dataset keys "
                          f"for a stream of its own, e.g. {{format: chat}}")
    weight = raw.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
        raise ConfigError(f"{path}.weight: expected a number >= 0, got {weight!r}")
    every = raw.get("every")
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ConfigError(f"{path}.every: expected an integer >= 1 (the component counts on every k-th step), got "
                          f"{every!r}")
    return Component(str(name), objective, data, float(weight), every)


@register("objective", "mixed", builder="effitrain.objectives.mixed:build",
          summary="Several objectives in one stage, each on its own data stream, summed with weights from a "
                  "schedule (timeline.objective_weights, constant, every k steps) or a controller (relift, sasr)")
@dataclass
class MixedParams:
    components: dict[str, Any] = param(
        default_factory=dict, help="{NAME: {objective: {name: sft}, data: stage | buffer | {dataset keys}, "
                                   "weight: 1.0, every: null}}: the loss is the sum of weight x each active "
                                   "component's loss")
    controller: Optional[dict[str, Any]] = param(
        None, help="a mix_controller block that sets the weights per step from the run (relift: SFT on the "
                   "questions GRPO failed; sasr: SFT/GRPO chosen by the SFT gradient norm); null = the schedule")
    seed: int = param(0, help="seed of the components' own data streams and of a controller's draws")

    def validate(self, path: str) -> None:
        if not self.components:
            raise ConfigError(f"{path}.components: empty; name the objectives to mix, e.g. {{rl: {{objective: grpo, "
                              f"data: stage}}, sft: {{objective: sft, data: {{format: chat}}}}}}")
        self.parsed = [parse_component(name, raw, f"{path}.components.{name}")
                       for name, raw in self.components.items()]
        self.controller_block = None
        if self.controller is not None:
            self.controller_block = REGISTRY.parse("mix_controller", self.controller, f"{path}.controller")
            self.controller_block.params.check_components(self.parsed, f"{path}.controller")
        governed = set(self.controller_block.params.governs(self.parsed)) if self.controller_block else set()
        for c in self.parsed:
            if c.data == "buffer" and c.name not in governed:
                raise ConfigError(f"{path}.components.{c.name}.data: buffer rows are collected by a controller, and "
                                  f"{'none is set' if self.controller_block is None else 'the controller ' + self.controller_block.name + ' fills no buffer of this component'}"
                                  f"; use data: stage or a mapping of dataset keys")
        free = [c for c in self.parsed if c.name not in governed]
        if free and not any(c.weight > 0 and c.every is None for c in free) and not governed:
            raise ConfigError(f"{path}.components: every component is off on some step (weight 0 or every k), so "
                              f"such a step would train on nothing; give one component a positive weight on every "
                              f"step")

    @property
    def stage_objective(self) -> Optional[str]:
        """The objective that reads the stage's own batches (what the stage's dataset format must fit)."""
        names = {c.objective.name for c in self.parsed if c.data == "stage"}
        return names.pop() if len(names) == 1 else None

    def check_timeline(self, timeline: Any, path: str = "timeline.objective_weights") -> None:
        """timeline.objective_weights names only components, and no step leaves every free component off."""
        if timeline is None or not timeline.declares("objective_weights"):
            return
        if self.controller_block is not None:
            raise ConfigError(f"{path}: the weights come from objective.controller "
                              f"({self.controller_block.name}); remove timeline.objective_weights or the controller")
        names = [c.name for c in self.parsed]
        always = [c.name for c in self.parsed if c.every is None]
        for i, (at, value) in enumerate(timeline.quantities["objective_weights"].points):
            for key in value:
                if key not in names:
                    raise ConfigError(f"{path}.points[{i}].value.{key}: no component of that name"
                                      f"{did_you_mean(str(key), names)}; the components: {choices_text(names)}")
            if not any(value.get(n, 0.0) > 0 for n in always):
                raise ConfigError(f"{path}.points[{i}].value: at {at} every component that counts on every step "
                                  f"({choices_text(always)}) has weight 0, so those steps would train on nothing")

    def check_inputs(self, path: str, *, spec: Any, deep: bool) -> None:
        from effitrain.config.blocks.dataset_chat import chat_format_problem

        for c in self.parsed:
            where = f"{path}.components.{c.name}"
            dataset = spec.block("dataset") if c.data == "stage" else None
            if _is_mapping(c.data):
                dataset = stream_dataset_block(spec.block("dataset"), c.data, f"{where}.data")
            if dataset is not None:
                problem = chat_format_problem(c.objective.name, dataset)
                if problem:
                    raise ConfigError(f"{where}: {problem}")
            fn = getattr(c.objective.params, "check_inputs", None)
            if callable(fn):
                fn(f"{where}.objective", spec=spec, deep=deep)

    # ------------------------------------------------------------------------------------------ effitrain plan
    def step_description(self, rows: int, seq_len: int) -> str:
        parts = []
        for c in self.parsed:
            data = {"stage": "the stage's batches", "buffer": "its controller's buffer"}.get(
                c.data if isinstance(c.data, str) else "", None) or \
                "its own stream (" + ", ".join(f"{k}={v}" for k, v in c.data.items()) + ")"
            describe = getattr(c.objective.params, "step_description", None)
            what = describe(rows, seq_len) if describe else f"{rows} packed rows of {seq_len} tokens"
            parts.append(f"{c.name} = {c.objective.name} on {data}: {what}")
        return "objective mixed, per step the weighted sum of " + "; ".join(parts)

    def plan_weights(self, step: int, timeline: Any) -> dict[str, str]:
        """Each component's weight at ``step`` as ``effitrain plan`` prints it: a number from the schedule, or the
        controller's rule where the value is known only at run time."""
        weights = timeline.value("objective_weights", step) if timeline.declares("objective_weights") else None
        controller = self.controller_block.params if self.controller_block else None
        governed = controller.governs(self.parsed) if controller else []
        return {c.name: controller.plan_weight(c.name, step) if c.name in governed
                else f"{c.scheduled_weight(step, weights):.3g}" for c in self.parsed}

    def plan_marks(self, max_steps: int) -> dict[int, str]:
        marks: dict[int, str] = {}
        for c in self.parsed:
            if c.every is not None and c.every - 1 < max_steps:
                marks[c.every - 1] = f"{c.name} every {c.every} steps from here"
        if self.controller_block is not None:
            marks.update(self.controller_block.params.plan_marks(max_steps))
        return marks

    def plan_notes(self) -> list[str]:
        notes = [f"objective mixed: loss = sum over components of weight x loss; a component with weight 0 at a "
                 f"step is not computed"]
        if self.controller_block is not None:
            notes.append(f"controller {self.controller_block.name}: {self.controller_block.params.rule()}")
        return notes


def stream_dataset_block(stage_dataset: Any, overrides: dict, path: str) -> Any:
    """The stage's dataset block with a component's overrides, validated as a dataset block of its own."""
    raw = {"name": stage_dataset.name, **dataclasses.asdict(stage_dataset.params)}
    valid = [f.name for f in dataclasses.fields(stage_dataset.params)]
    for key in overrides:
        if key not in valid:
            raise ConfigError(f"{path}.{key}: the stage's dataset ({stage_dataset.name}) has no such key"
                              f"{did_you_mean(str(key), valid)}; valid: {choices_text(valid)}")
    raw.update(overrides)
    return REGISTRY.parse("dataset", raw, path)


@rule("mixed_grpo_needs_whole_parameters", "a grpo component of objective mixed samples with model.generate, which "
                                           "needs whole parameters: ZeRO <= 2")
def _mixed_grpo_whole_parameters(spec, env) -> Optional[str]:
    objective = spec.block("objective")
    if objective.name != "mixed":
        return None
    if spec.block("parallelism").params.stage == 3 and any(c.objective.name == "grpo"
                                                            for c in objective.params.parsed):
        return ("objective=mixed has a grpo component, which samples completions with whole parameters that ZeRO-3 "
                "partitions; use parallelism=zero2")
    return None
