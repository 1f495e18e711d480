"""The timeline: quantities that change with training progress, declared in one place (the root key ``timeline:``).

Each quantity is a piecewise function of progress with an explicit unit::

    timeline:
      seq_len: {unit: step, points: [{at: 0, value: 32}, {at: 100, value: 128}]}
      mixture:
        unit: fraction                       # of train.max_steps
        points:
          - {at: 0,   value: {prose: 0.5, code: 0.5}}
          - {at: 0.8, value: {prose: 0.2, code: 0.8}}
      lr: {unit: tokens, interpolate: linear, points: [{at: 0, value: 0.0}, {at: 40960, value: 1.0}]}
      phases: {unit: fraction, intervals: {anneal: [0.8, 1.0]}}

``unit`` is ``step`` (optimizer steps completed), ``tokens`` (training tokens seen, all ranks together) or
``fraction`` (of ``train.max_steps``).  A point's value holds from its ``at`` until the next point (``interpolate:
linear`` — for ``lr``, ``competence`` and ``distill_weight`` — draws straight lines between points instead).  The first point is at 0.

Who reads what: ``mixture`` — the ``curriculum: mixture`` sampler; ``seq_len`` — a batch hook that reshapes each
packed ``[B, L]`` micro-batch into ``[B*L/l, l]`` (:mod:`effitrain.timeline_hooks`); ``lr`` — ``scheduler:
timeline``; ``phases`` — any hook, through ``state.timeline.phase(step)``; ``objective_weights`` — ``objective: mixed``.  The loop reads none of them.

This module is torch-free: validation (``effitrain check``) and ``effitrain plan`` use it.  :func:`parse_timeline`
checks the declaration (one-line :class:`ConfigError` naming the key); :meth:`TimelineSpec.resolve` turns the
declared units into optimizer steps for one run (``max_steps``, tokens per step) and gives a :class:`Timeline`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from effitrain.registry import ConfigError, choices_text, did_you_mean

UNITS = ("step", "tokens", "fraction")
#: quantity -> what it is (shown in errors and by ``effitrain plan``)
QUANTITIES = {
    "seq_len": "sequence length the model sees (divides dataset.seq_len; tokens per step stay constant)",
    "mixture": "per-domain sampling weights (read by curriculum: mixture)",
    "lr": "multiplier of optimizer.lr (read by scheduler: timeline)",
    "phases": "named intervals that hooks query (state.timeline.phase(step))",
    "competence": "share of the difficulty-sorted rows in play, in (0, 1] (read by curriculum: difficulty); "
                  "declared by points or by a pacing function {function: linear|root|step, start, until}",
    "distill_weight": "weight of the teacher's soft loss in [0, 1], in place of objective.alpha (read by "
                      "objective: distill; SALT's KD phase and its decay to plain next-token training)",
    "objective_weights": "the weight of each component of objective: mixed, {COMPONENT: weight >= 0} (read by "
                         "objective: mixed; linear interpolation blends two objectives over a stage)",
}
NOT_SUPPORTED = {
    "batch_size": "timeline.batch_size: not supported yet (changing the global batch mid-run is not implemented "
                  "resumably); set train.micro_batch_size / train.grad_accum for the whole run",
}
_LINEAR_OK = {"lr", "competence", "distill_weight", "objective_weights"}  # quantities whose values may be interpolated; the others change in steps
_WEIGHT_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Piecewise:
    """One declared quantity: ``points`` are ``(at, value)`` in ``unit``, ``at`` strictly increasing from 0."""
    name: str
    unit: str
    points: tuple
    interpolate: str = "step"


@dataclass(frozen=True)
class Phases:
    unit: str
    intervals: tuple  # ((name, start, end), ...) sorted by start, not overlapping; end is exclusive


@dataclass(frozen=True)
class TimelineSpec:
    """The validated declaration, still in its declared units."""
    quantities: dict = field(default_factory=dict)   # name -> Piecewise
    phases: Optional[Phases] = None

    def __bool__(self) -> bool:
        return bool(self.quantities) or self.phases is not None

    def declares(self, name: str) -> bool:
        return name in self.quantities or (name == "phases" and self.phases is not None)

    def resolve(self, *, max_steps: int, tokens_per_step: int) -> "Timeline":
        """The timeline of one run: every ``at`` converted to the first optimizer step at or after it (a ``tokens``
        breakpoint: the first step that starts with at least that many tokens seen)."""
        def to_step(at: float, unit: str) -> int:
            if unit == "step":
                return int(at)
            if unit == "tokens":
                return -(-int(at) // tokens_per_step)  # ceil: the first step that starts with >= at tokens seen
            return math.ceil(at * max_steps - 1e-9)     # fraction; the epsilon absorbs 0.8 * 200 = 160.00000000000003

        resolved: dict[str, tuple] = {}
        for name, q in self.quantities.items():
            steps = []
            for i, (at, value) in enumerate(q.points):
                s = to_step(at, q.unit)
                if steps and s == steps[-1][0]:  # in a short run two breakpoints may fall on one step: the
                    steps.pop()                  # earlier value then holds for zero steps
                steps.append((s, value))
            resolved[name] = tuple(steps)
        phases: tuple = ()
        if self.phases is not None:
            # a phase shorter than one step in this run resolves to an empty interval: phase() never names it
            phases = tuple((n, to_step(a, self.phases.unit), to_step(b, self.phases.unit))
                           for n, a, b in self.phases.intervals)
        return Timeline(resolved, {n: q.interpolate for n, q in self.quantities.items()}, phases,
                        max_steps=max_steps, tokens_per_step=tokens_per_step)


class Timeline:
    """A resolved timeline: every quantity as ``(step, value)`` breakpoints, every phase as ``[start, end)`` steps.

    ``value(name, step)`` is the quantity in force while optimizer step ``step`` is computed (``step`` = steps
    completed, as in ``state.step``); ``phase(step)`` names the phase it falls in (None between phases)."""

    def __init__(self, points: dict[str, tuple], interpolate: dict[str, str], phases: tuple, *, max_steps: int,
                 tokens_per_step: int) -> None:
        self.points = points
        self.interpolate = interpolate
        self.phases = phases
        self.max_steps = max_steps
        self.tokens_per_step = tokens_per_step

    def __bool__(self) -> bool:
        return bool(self.points) or bool(self.phases)

    def declares(self, name: str) -> bool:
        return name in self.points

    def value(self, name: str, step: Optional[int] = None, tokens: Optional[int] = None) -> Any:
        """The value of ``name`` at ``step`` (or at ``tokens`` seen: the step those tokens fall in)."""
        if name not in self.points:
            raise KeyError(f"the timeline declares no '{name}' (it declares: {choices_text(self.points) or 'none'})")
        if step is None:
            if tokens is None:
                raise TypeError("value() needs step or tokens")
            step = int(tokens) // self.tokens_per_step
        pts = self.points[name]
        i = 0
        while i + 1 < len(pts) and pts[i + 1][0] <= step:
            i += 1
        at, value = pts[i]
        if self.interpolate.get(name) == "linear" and i + 1 < len(pts):
            nxt, nvalue = pts[i + 1]
            share = (step - at) / (nxt - at)
            if isinstance(value, Mapping):  # objective_weights: each key on its own line (absent keys weigh 0)
                return {k: value.get(k, 0.0) + (nvalue.get(k, 0.0) - value.get(k, 0.0)) * share
                        for k in sorted(set(value) | set(nvalue))}
            return value + (nvalue - value) * share
        return value

    def phase(self, step: int) -> Optional[str]:
        for name, start, end in self.phases:
            if start <= step < end:
                return name
        return None

    def in_phase(self, name: str, step: int) -> bool:
        return self.phase(step) == name

    def change_steps(self) -> list[int]:
        """Every step at which something declared changes (breakpoints and phase boundaries), sorted."""
        steps = {s for pts in self.points.values() for s, _ in pts}
        steps |= {s for _, a, b in self.phases for s in (a, b)}
        return sorted(s for s in steps if s <= self.max_steps)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (checkpointed): what the timeline decided, in steps."""
        return {"points": {n: [[s, v] for s, v in pts] for n, pts in self.points.items()},
                "interpolate": dict(self.interpolate), "phases": [list(p) for p in self.phases],
                "max_steps": self.max_steps, "tokens_per_step": self.tokens_per_step}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Timeline":
        return cls({n: tuple((int(s), v) for s, v in pts) for n, pts in d["points"].items()},
                   dict(d["interpolate"]), tuple(tuple(p) for p in d["phases"]), max_steps=int(d["max_steps"]),
                   tokens_per_step=int(d["tokens_per_step"]))

    def first_difference(self, other: "Timeline", until: int) -> Optional[str]:
        """Where ``other`` differs from this timeline on steps ``[0, until)``, or None if they agree there.

        Both are piecewise constant or linear between their breakpoints, so agreeing at every breakpoint of either
        below ``until`` and at ``until - 1`` means agreeing on the whole interval."""
        if until <= 0:
            return None
        names = sorted(set(self.points) | set(other.points))
        for name in names:
            if (name in self.points) != (name in other.points):
                return f"'{name}' is declared in only one of them"
            probes = {s for s, _ in self.points[name] + other.points[name] if s < until} | {until - 1}
            for s in sorted(probes):
                a, b = self.value(name, s), other.value(name, s)
                if not _same(a, b):
                    return f"{name} at step {s}: {a!r} before, {b!r} now"
        probes = {s for _, x, y in self.phases + other.phases for s in (x, y) if s < until} | {0, until - 1}
        for s in sorted(probes):
            if self.phase(s) != other.phase(s):
                return f"phase at step {s}: {self.phase(s)!r} before, {other.phase(s)!r} now"
        return None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)
    return a == b


# ---------------------------------------------------------------------------------------------------------------
# Parsing and validation (torch-free)
# ---------------------------------------------------------------------------------------------------------------

def _number(value: Any, key: str, *, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}: expected {'an integer' if integer else 'a number'}, got {value!r}")
    if integer and (isinstance(value, float) and not value.is_integer()):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    return int(value) if integer else value


def _unit(body: Mapping[str, Any], key: str) -> str:
    unit = body.get("unit")
    if unit is None:
        raise ConfigError(f"{key}.unit: required; valid: {choices_text(UNITS)}")
    if unit not in UNITS:
        raise ConfigError(f"{key}.unit: unknown unit {unit!r}{did_you_mean(unit, UNITS)}; valid: {choices_text(UNITS)}")
    return unit


def _at(value: Any, unit: str, key: str) -> float:
    at = _number(value, key, integer=unit in ("step", "tokens"))
    if at < 0:
        raise ConfigError(f"{key}: {at} is negative; progress starts at 0")
    if unit == "fraction" and at >= 1:
        raise ConfigError(f"{key}: {at} is not a fraction of the run in [0, 1)")
    return at


def _check_keys(body: Mapping[str, Any], allowed: Sequence[str], key: str) -> None:
    for k in body:
        if k not in allowed:
            raise ConfigError(f"{key}.{k}: unknown key{did_you_mean(str(k), allowed)}; valid keys: "
                              f"{choices_text(allowed)}")


def _mixture_value(value: Any, key: str, domains: Optional[Sequence[str]]) -> dict[str, float]:
    if not isinstance(value, Mapping) or not value:
        raise ConfigError(f"{key}: expected a mapping of domain to weight, e.g. {{prose: 0.5, code: 0.5}}, "
                          f"got {value!r}")
    weights = {}
    for domain, w in value.items():
        if domains is not None and domain not in domains:
            raise ConfigError(f"{key}.{domain}: unknown domain{did_you_mean(str(domain), domains)}; the dataset's "
                              f"domains: {choices_text(domains)}")
        w = _number(w, f"{key}.{domain}")
        if w < 0:
            raise ConfigError(f"{key}.{domain}: a weight cannot be negative ({w})")
        weights[str(domain)] = float(w)
    total = sum(weights.values())
    if abs(total - 1.0) > _WEIGHT_TOLERANCE:
        raise ConfigError(f"{key}: the weights sum to {total:.6g}, not 1")
    return weights


def _objective_weights_value(value: Any, key: str) -> dict[str, float]:
    """{component: weight >= 0} (the component names are checked against objective: mixed at check)."""
    if not isinstance(value, Mapping) or not value:
        raise ConfigError(f"{key}: expected a mapping of component to weight, e.g. {{rl: 1.0, sft: 0.5}}, got "
                          f"{value!r}")
    weights = {}
    for name, w in value.items():
        w = _number(w, f"{key}.{name}")
        if w < 0:
            raise ConfigError(f"{key}.{name}: a weight cannot be negative ({w})")
        weights[str(name)] = float(w)
    return weights


def _point_value(name: str, value: Any, key: str, *, dataset_seq_len: Optional[int],
                 domains: Optional[Sequence[str]]) -> Any:
    if name == "mixture":
        return _mixture_value(value, key, domains)
    if name == "objective_weights":
        return _objective_weights_value(value, key)
    if name == "seq_len":
        n = _number(value, key, integer=True)
        if n < 1:
            raise ConfigError(f"{key}: a sequence length must be positive, got {n}")
        if dataset_seq_len is not None and dataset_seq_len % n:
            raise ConfigError(f"{key}: {n} does not divide the packed length dataset.seq_len={dataset_seq_len}; "
                              f"a packed row is cut into dataset.seq_len / seq_len pieces")
        return n
    n = _number(value, key)  # lr, competence, distill_weight
    if name == "distill_weight" and not 0 <= n <= 1:
        raise ConfigError(f"{key}: a distillation weight is in [0, 1] (1 - it weighs the next-token loss), got {n}")
    if name == "competence" and not 0 < n <= 1:
        raise ConfigError(f"{key}: a competence is a share of the rows in (0, 1], got {n}")
    if n < 0:
        raise ConfigError(f"{key}: an lr multiplier cannot be negative ({n})")
    return float(n)


def _piecewise(name: str, body: Any, *, dataset_seq_len: Optional[int], domains: Optional[Sequence[str]]) -> Piecewise:
    key = f"timeline.{name}"
    if not isinstance(body, Mapping):
        raise ConfigError(f"{key}: expected a mapping with unit and points, got {body!r}")
    if name == "competence" and "pacing" in body:
        return _pacing(body, key)
    _check_keys(body, ("unit", "points", "interpolate") if name in _LINEAR_OK else ("unit", "points"), key)
    unit = _unit(body, key)
    interpolate = body.get("interpolate", "step")
    if interpolate not in ("step", "linear"):
        raise ConfigError(f"{key}.interpolate: unknown value {interpolate!r}; valid: linear, step")
    points = body.get("points")
    if not isinstance(points, Sequence) or isinstance(points, str) or not points:
        raise ConfigError(f"{key}.points: expected a non-empty list of {{at, value}}, got {points!r}")
    parsed = []
    for i, point in enumerate(points):
        pkey = f"{key}.points[{i}]"
        if not isinstance(point, Mapping):
            raise ConfigError(f"{pkey}: expected a mapping {{at: ..., value: ...}}, got {point!r}")
        _check_keys(point, ("at", "value"), pkey)
        if "at" not in point or "value" not in point:
            raise ConfigError(f"{pkey}: needs both 'at' and 'value'")
        at = _at(point["at"], unit, f"{pkey}.at")
        if i == 0 and at != 0:
            raise ConfigError(f"{pkey}.at: the first breakpoint must be at 0 (the value before it would be "
                              f"undefined), got {at}")
        if parsed and at <= parsed[-1][0]:
            raise ConfigError(f"{pkey}.at: breakpoints must be strictly increasing, {at} follows {parsed[-1][0]}")
        parsed.append((at, _point_value(name, point["value"], f"{pkey}.value", dataset_seq_len=dataset_seq_len,
                                        domains=domains)))
    return Piecewise(name, unit, tuple(parsed), interpolate)


def _phases(body: Any) -> Phases:
    key = "timeline.phases"
    if not isinstance(body, Mapping):
        raise ConfigError(f"{key}: expected a mapping with unit and intervals, got {body!r}")
    _check_keys(body, ("unit", "intervals"), key)
    unit = _unit(body, key)
    intervals = body.get("intervals")
    if not isinstance(intervals, Mapping) or not intervals:
        raise ConfigError(f"{key}.intervals: expected a mapping of phase name to [start, end], got {intervals!r}")
    parsed = []
    for name, span in intervals.items():
        ikey = f"{key}.intervals.{name}"
        if not isinstance(span, Sequence) or isinstance(span, str) or len(span) != 2:
            raise ConfigError(f"{ikey}: expected [start, end], got {span!r}")
        start = _at(span[0], unit, ikey)
        end = _number(span[1], ikey, integer=unit != "fraction")
        if unit == "fraction" and end > 1:
            raise ConfigError(f"{ikey}: end {end} is past the end of the run (1)")
        if end <= start:
            raise ConfigError(f"{ikey}: end {end} must come after start {start}")
        parsed.append((str(name), start, end))
    parsed.sort(key=lambda p: p[1])
    for (a, _, a_end), (b, b_start, _) in zip(parsed, parsed[1:]):
        if b_start < a_end:
            raise ConfigError(f"{key}.intervals.{b}: overlaps phase '{a}' (phases are disjoint, so phase(step) "
                              f"names one)")
    return Phases(unit, tuple(parsed))


_PACING_KEYS = ("function", "start", "until", "increase", "step_length")


def _pacing(body: Mapping[str, Any], key: str) -> Piecewise:
    """``competence: {pacing: {function, start, until, [increase, step_length]}}``: the pacing function's
    breakpoints (:mod:`effitrain.curriculum.pacing`), ``until`` a fraction of train.max_steps (unit fraction)."""
    from effitrain.curriculum.pacing import FUNCTIONS, breakpoints

    _check_keys(body, ("pacing",), key)
    pacing = body["pacing"]
    pkey = f"{key}.pacing"
    if not isinstance(pacing, Mapping):
        raise ConfigError(f"{pkey}: expected a mapping {{function, start, until}}, got {pacing!r}")
    _check_keys(pacing, _PACING_KEYS, pkey)
    function = pacing.get("function")
    if function not in FUNCTIONS:
        raise ConfigError(f"{pkey}.function: unknown pacing {function!r}{did_you_mean(str(function), FUNCTIONS)}; "
                          f"valid: {choices_text(FUNCTIONS)}")
    start = _number(pacing.get("start", 0.1), f"{pkey}.start")
    until = _number(pacing.get("until", 0.5), f"{pkey}.until")
    increase = _number(pacing.get("increase", 2.0), f"{pkey}.increase")
    step_length = _number(pacing.get("step_length", 0.1), f"{pkey}.step_length")
    if not 0 < start <= 1:
        raise ConfigError(f"{pkey}.start: the first competence is a share of the rows in (0, 1], got {start}")
    if not 0 < until <= 1:
        raise ConfigError(f"{pkey}.until: the fraction of train.max_steps where all rows are in play, in (0, 1], "
                          f"got {until}")
    if increase <= 1 or not 0 < step_length <= 1:
        raise ConfigError(f"{pkey}: step pacing needs increase > 1 and step_length in (0, 1], got {increase}, "
                          f"{step_length}")
    points = breakpoints(function, start=start, until=until, increase=increase, step_length=step_length)
    dedup: list[tuple[float, float]] = []
    for at, value in points:
        if dedup and at <= dedup[-1][0]:
            continue
        dedup.append((at, value))
    return Piecewise("competence", "fraction", tuple(dedup), "step" if function == "step" else "linear")


def parse_timeline(raw: Any, *, dataset_seq_len: Optional[int] = None,
                   domains: Optional[Sequence[str]] = None) -> TimelineSpec:
    """Validate the ``timeline:`` mapping.  ``domains`` (when the dataset's domains are known without reading it)
    and ``dataset_seq_len`` let the mixture's domains and the sequence lengths be checked here."""
    if raw is None:
        return TimelineSpec()
    if not isinstance(raw, Mapping):
        raise ConfigError(f"timeline: expected a mapping of quantity to its schedule, got {raw!r}")
    quantities: dict[str, Piecewise] = {}
    phases = None
    valid = list(QUANTITIES)
    for name, body in raw.items():
        if name in NOT_SUPPORTED:
            raise ConfigError(NOT_SUPPORTED[name])
        if name not in QUANTITIES:
            raise ConfigError(f"timeline.{name}: unknown quantity{did_you_mean(str(name), valid)}; valid: "
                              f"{choices_text(valid)}")
        if name == "phases":
            phases = _phases(body)
        else:
            quantities[name] = _piecewise(name, body, dataset_seq_len=dataset_seq_len, domains=domains)
    return TimelineSpec(quantities, phases)


def check_readers(timeline: TimelineSpec, *, curriculum: str, scheduler: str, objective: str = "") -> None:
    """A declared quantity needs the block that reads it, and that block needs the quantity."""
    pairs = (("mixture", "curriculum", curriculum, "mixture"), ("lr", "scheduler", scheduler, "timeline"),
             ("competence", "curriculum", curriculum, "difficulty"))
    if timeline.declares("objective_weights") and objective != "mixed":
        raise ConfigError(f"timeline.objective_weights: read only by objective=mixed, but objective="
                          f"{objective or '?'}; select objective=mixed or remove timeline.objective_weights")
    if timeline.declares("distill_weight") and objective != "distill":  # distill reads it when declared, else alpha
        raise ConfigError(f"timeline.distill_weight: read only by objective=distill, but objective={objective or '?'}; "
                          f"select objective=distill or remove timeline.distill_weight")
    for quantity, group, chosen, reader in pairs:
        if timeline.declares(quantity) and chosen != reader:
            raise ConfigError(f"timeline.{quantity}: read only by {group}={reader}, but {group}={chosen}; select "
                              f"{group}={reader} or remove timeline.{quantity}")
        if chosen == reader and not timeline.declares(quantity):
            raise ConfigError(f"{group}: '{reader}' follows timeline.{quantity}, which is not declared; add "
                              f"timeline.{quantity} (see docs/architecture.md, Timeline contract)")
