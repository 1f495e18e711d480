"""The reproduction ledger: each recipe's paper claim beside what this project measured, with a verdict in words.

The figures live in small files, ``docs/results/NAME.json`` (one per recipe), so a later session adds a seed or a
benchmark to one recipe without re-running the others.  ``effitrain lock`` renders them into ``docs/reproductions.md``
and into a ``reproduction`` row of each card's generated block; ``effitrain lock --check`` (and a test) fails while
either is stale.  Torch-free: reading JSON and arithmetic.

A results file::

    {"recipe": "g_stack",
     "claim": "at 7B, reaches the from-scratch loss with 194B instead of 300B tokens (54.6% speed-up)",
     "scale": {"paper": "7B parameters, 300B tokens", "here": "1.3M parameters, 0.26M tokens"},
     "measurements": [{
        "label": "eval loss at equal FLOPs", "metric": "final eval loss", "better": "lower", "expect": "better",
        "recipe": [5.5293, 5.6577, 5.5271], "baseline": [5.7634, 5.7211, 5.7964],
        "baseline_name": "4 layers from scratch, same total FLOPs", "seeds": [0, 1, 2], "noise": 0.03,
        "command": "python scripts/bench_growth.py ...", "source": "docs/benchmarks.md#G_stack vs ..."}],
     "not_measured": null}

``recipe`` and ``baseline`` hold one value per seed (paired by position when both have one per seed; a single
baseline value is shared by every seed).  ``seeds: null`` marks a figure no seed moves (the size of a tensor).
``noise`` is the run-to-run difference the benchmark's own reading calls noise; ``command`` is the command line that
wrote the figures, or a list of them when seeds came from separate invocations.  ``expect`` is what the paper claims
about the metric: ``better`` (the recipe beats the baseline) or ``no worse`` (it matches it).  A recipe without a
measurement says why in ``not_measured``; one whose headline claim is not what was measured may say so there too.

Every value of a measurement whose ``source`` is a section of ``docs/benchmarks.md`` must appear in that section's
text (:func:`unsupported_values`): a number enters the ledger only from a command's written output.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from effitrain.registry import ConfigError

REPO_DOCS = Path(__file__).resolve().parents[2] / "docs"
RESULTS_DIR = "results"
LEDGER = "reproductions.md"
BENCHMARKS_SOURCE = "docs/benchmarks.md#"

REPRODUCED, WITHIN_NOISE, OPPOSITE, NOT_MEASURED = ("reproduced in direction", "within noise", "opposite",
                                                    "not measured")
_EXPECT = ("better", "no worse")
_BETTER = ("lower", "higher")


@dataclass
class Measurement:
    label: str
    metric: str
    better: str
    expect: str
    recipe: list[float]
    baseline: list[float]
    baseline_name: str
    seeds: Optional[list[int]]
    noise: float
    commands: list[str]              # what wrote the figures (several when seeds came from separate runs)
    source: str
    note: str = ""

    def gains(self) -> list[float]:
        """Per seed, how much better the recipe did than the baseline (positive = better, in the metric's units)."""
        base = self.baseline if len(self.baseline) == len(self.recipe) else [statistics.mean(self.baseline)] * len(
            self.recipe)
        sign = -1.0 if self.better == "lower" else 1.0
        return [sign * (r - b) for r, b in zip(self.recipe, base)]

    def spread(self) -> Optional[float]:
        """The sample standard deviation of the per-seed gains (None with one value)."""
        gains = self.gains()
        return statistics.stdev(gains) if len(gains) > 1 else None

    def verdict(self) -> str:
        """``reproduced in direction`` when every seed's gain is positive and their mean exceeds the noise,
        ``opposite`` when every seed's is negative and the mean's size exceeds it, ``within noise`` otherwise."""
        gains = self.gains()
        mean = statistics.mean(gains)
        if mean > self.noise and min(gains) > 0:
            return REPRODUCED
        if -mean > self.noise and max(gains) < 0:
            return OPPOSITE
        return WITHIN_NOISE

    def holds(self) -> bool:
        """Whether the verdict is what the paper's claim predicts (a 'no worse' claim holds within noise too)."""
        return self.verdict() == REPRODUCED or (self.expect == "no worse" and self.verdict() == WITHIN_NOISE)

    def seeds_text(self) -> str:
        if self.seeds is None:
            return "no seed moves it"
        return f"{len(self.seeds)} seed{'s' if len(self.seeds) != 1 else ''} ({', '.join(map(str, self.seeds))})"

    def figure_text(self) -> str:
        recipe, base = _values(self.recipe), _values(self.baseline)
        mean = statistics.mean(self.gains())
        spread = self.spread()
        gain = f"{'−' if mean < 0 else '+'}{_num(abs(mean))}" + (f" ± {_num(spread)}" if spread is not None else "")
        return (f"{self.metric} ({self.better} is better): {recipe} vs {base} for {self.baseline_name}; "
                f"gain {gain}; noise {_num(self.noise)}; {self.seeds_text()}")


@dataclass
class Result:
    recipe: str
    claim: str
    scale_paper: str
    scale_here: str
    measurements: list[Measurement] = field(default_factory=list)
    not_measured: Optional[str] = None

    def verdict(self) -> str:
        """The row's verdict in words: the measurements' verdicts (each labelled when there are several), or
        ``not measured: <reason>``."""
        if not self.measurements:
            return f"{NOT_MEASURED}: {self.not_measured}"
        if len(self.measurements) == 1:
            m = self.measurements[0]
            return m.verdict() + (" (the claim: no worse)" if m.expect == "no worse" else "")
        return "; ".join(f"{m.label}: {m.verdict()}" + (" (claim: no worse)" if m.expect == "no worse" else "")
                         for m in self.measurements)

    def headline_verdict(self) -> str:
        return self.measurements[0].verdict() if self.measurements else NOT_MEASURED


# ------------------------------------------------------------------------------------------------------ reading
def _num(value: float) -> str:
    return f"{value:.4g}"


def _value(v: float) -> str:
    """A value as the benchmark tables print it: counts with thousands separators, the rest in ``g`` form."""
    return f"{int(v):,}" if v.is_integer() and abs(v) >= 1e4 else f"{v:g}"


def _values(values: list[float]) -> str:
    return ", ".join(_value(v) for v in values)


def _need(data: dict, key: str, kind: type, where: str) -> Any:
    if key not in data:
        raise ConfigError(f"{where}: missing key '{key}'")
    value = data[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is str and not value.strip()):
        raise ConfigError(f"{where}.{key}: expected {'a non-empty string' if kind is str else kind.__name__}, "
                          f"got {value!r}")
    return value


def _numbers(data: dict, key: str, where: str) -> list[float]:
    values = data.get(key)
    if (not isinstance(values, list) or not values
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                       for v in values)):
        raise ConfigError(f"{where}.{key}: expected a non-empty list of finite numbers (one per seed), got {values!r}")
    return [float(v) for v in values]


def _commands(data: dict, where: str) -> list[str]:
    """``command``: one command line, or a list of them (seeds run by separate invocations)."""
    command = data.get("command")
    commands = [command] if isinstance(command, str) else command
    if not isinstance(commands, list) or not commands or not all(isinstance(c, str) and c.strip() for c in commands):
        raise ConfigError(f"{where}.command: expected the command line that wrote the figures (or a list of them), "
                          f"got {command!r}")
    return commands


def parse_measurement(data: Any, where: str) -> Measurement:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected an object, got {type(data).__name__}")
    known = {"label", "metric", "better", "expect", "recipe", "baseline", "baseline_name", "seeds", "noise",
             "command", "source", "note"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    m = Measurement(label=_need(data, "label", str, where), metric=_need(data, "metric", str, where),
                    better=_need(data, "better", str, where), expect=_need(data, "expect", str, where),
                    recipe=_numbers(data, "recipe", where), baseline=_numbers(data, "baseline", where),
                    baseline_name=_need(data, "baseline_name", str, where), seeds=data.get("seeds"),
                    noise=_need(data, "noise", float, where), commands=_commands(data, where),
                    source=_need(data, "source", str, where), note=data.get("note") or "")
    if m.better not in _BETTER:
        raise ConfigError(f"{where}.better: {m.better!r}; valid: {', '.join(_BETTER)}")
    if m.expect not in _EXPECT:
        raise ConfigError(f"{where}.expect: {m.expect!r}; valid: {', '.join(_EXPECT)}")
    if m.noise < 0:
        raise ConfigError(f"{where}.noise: {m.noise} is negative")
    if m.seeds is not None:
        if not isinstance(m.seeds, list) or not all(isinstance(s, int) for s in m.seeds):
            raise ConfigError(f"{where}.seeds: expected a list of integers, or null for a figure no seed moves")
        if len(m.seeds) != len(m.recipe):
            raise ConfigError(f"{where}.seeds: {len(m.seeds)} seed(s) for {len(m.recipe)} recipe value(s); give one "
                              f"value per seed")
    elif len(m.recipe) != 1:
        raise ConfigError(f"{where}.recipe: a figure no seed moves (seeds: null) has one value")
    if len(m.baseline) not in (1, len(m.recipe)):
        raise ConfigError(f"{where}.baseline: {len(m.baseline)} value(s); give one, or one per seed "
                          f"({len(m.recipe)})")
    return m


def parse_result(data: Any, where: str) -> Result:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(data).__name__}")
    known = {"recipe", "claim", "scale", "measurements", "not_measured"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    scale = _need(data, "scale", dict, where)
    measurements = data.get("measurements") or []
    if not isinstance(measurements, list):
        raise ConfigError(f"{where}.measurements: expected a list")
    result = Result(recipe=_need(data, "recipe", str, where), claim=_need(data, "claim", str, where),
                    scale_paper=_need(scale, "paper", str, f"{where}.scale"),
                    scale_here=_need(scale, "here", str, f"{where}.scale"),
                    measurements=[parse_measurement(m, f"{where}.measurements[{i}]")
                                  for i, m in enumerate(measurements)],
                    not_measured=data.get("not_measured"))
    if not result.measurements and not (isinstance(result.not_measured, str) and result.not_measured.strip()):
        raise ConfigError(f"{where}: no measurement and no reason; set not_measured to why the claim was not "
                          f"measured here")
    return result


def load_results(docs: Optional[Path] = None) -> dict[str, Result]:
    """recipe -> its parsed results file, in recipe order."""
    folder = (docs or REPO_DOCS) / RESULTS_DIR
    results = {}
    for path in sorted(folder.glob("*.json")):
        where = f"docs/{RESULTS_DIR}/{path.name}"
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        result = parse_result(data, where)
        if result.recipe != path.stem:
            raise ConfigError(f"{where}: names recipe '{result.recipe}'; a results file is named after its recipe")
        results[result.recipe] = result
    return results


# ---------------------------------------------------------------------------------------------- the source check
def benchmark_section(heading: str, benchmarks: Optional[Path] = None) -> Optional[str]:
    """The text of the section of docs/benchmarks.md under the heading ``heading`` (any level), up to the next
    heading of the same or a higher level; None when there is no such heading."""
    lines = (benchmarks or REPO_DOCS / "benchmarks.md").read_text().splitlines()
    for i, line in enumerate(lines):
        level = len(line) - len(line.lstrip("#"))
        if level and line[level:].strip() == heading:
            body = []
            for rest in lines[i + 1:]:
                other = len(rest) - len(rest.lstrip("#"))
                if other and other <= level and rest[other:].startswith(" "):
                    break
                body.append(rest)
            return "\n".join(body)
    return None


def _spellings(value: float) -> set[str]:
    integral = {str(int(value)), f"{int(value):,}"} if value.is_integer() else set()
    return {f"{value:g}", *(f"{value:.{d}f}" for d in range(1, 5)), *integral}


def unsupported_values(result: Result, benchmarks: Optional[Path] = None) -> list[str]:
    """What of ``result`` is not backed by docs/benchmarks.md: a measurement naming a section that does not exist,
    a value absent from the section it names, or a command that the section does not show."""
    problems = []
    for i, m in enumerate(result.measurements):
        if not m.source.startswith(BENCHMARKS_SOURCE):
            continue
        heading = m.source[len(BENCHMARKS_SOURCE):]
        text = benchmark_section(heading, benchmarks)
        if text is None:
            problems.append(f"{result.recipe}: measurement {i} names section '{heading}', which docs/benchmarks.md "
                            f"does not have")
            continue
        for value in [*m.recipe, *m.baseline]:
            if not any(s in text for s in _spellings(value)):
                problems.append(f"{result.recipe}: measurement {i}: {_value(value)} is not in section '{heading}'")
        for command in m.commands:
            if command not in text:
                problems.append(f"{result.recipe}: measurement {i}: its command is not in section '{heading}'")
    return problems


# ------------------------------------------------------------------------------------------------------ writing
def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def card_row(result: Optional[Result]) -> str:
    """The ``reproduction`` row of a card's generated block."""
    if result is None:
        return f"| reproduction | no docs/{RESULTS_DIR} file yet |"
    if not result.measurements:
        return f"| reproduction | {_cell(result.verdict())} (docs/{LEDGER}) |"
    figures = "; ".join(m.figure_text() for m in result.measurements)
    return f"| reproduction | {_cell(result.verdict())} — {_cell(figures)} (docs/{LEDGER}) |"


def ledger_text(results: dict[str, Result], recipes: list[str]) -> str:
    """docs/reproductions.md: one row per recipe (all of ``recipes``), the commands after the table."""
    commands: dict[str, int] = {}
    for name in recipes:
        for m in results[name].measurements if name in results else []:
            for command in m.commands:
                commands.setdefault(command, len(commands) + 1)
    counts = {v: 0 for v in (REPRODUCED, WITHIN_NOISE, OPPOSITE, NOT_MEASURED)}
    for name in recipes:
        counts[results[name].headline_verdict()] += 1
    lines = ["# Reproductions: each recipe's paper claim against what this project measured",
             "",
             f"Generated by `effitrain lock` from `docs/{RESULTS_DIR}/*.json` (one file per recipe; add a seed or a "
             "benchmark there and re-run `effitrain lock`). Do not edit.",
             "",
             "How to read a row. *Measured here*: the metric, the recipe's value(s) against the baseline's (one value "
             "per seed, paired by seed), the gain (positive = better than the baseline, mean ± the standard "
             "deviation over seeds), the run-to-run noise the benchmark's own reading states, and the command [Cn] "
             "that wrote the figures (listed below the table). *Verdict*: **reproduced in direction** when every "
             "seed's gain is positive and their mean exceeds the noise; **opposite** when every seed's is negative "
             "and the mean's size exceeds it; **within noise** otherwise; *(the claim: no worse)* marks claims of "
             "matching a baseline, which within noise supports. A direction at this scale is not the paper's "
             "number: the *scale* column gives the gap.",
             "",
             f"Headline verdicts (first measurement of each recipe): {counts[REPRODUCED]} reproduced in direction, "
             f"{counts[WITHIN_NOISE]} within noise, {counts[OPPOSITE]} opposite, {counts[NOT_MEASURED]} not "
             f"measured, of {len(recipes)} recipes.",
             "",
             "| recipe | paper's claim | measured here | verdict | scale: paper → here |",
             "|---|---|---|---|---|"]
    for name in recipes:
        r = results[name]
        measured = "<br>".join(f"{_cell(m.label)}: {_cell(m.figure_text())} "
                               f"[{', '.join(f'C{commands[c]}' for c in m.commands)}]"
                               + (f" ({_cell(m.note)})" if m.note else "") for m in r.measurements)
        if r.measurements and r.not_measured:
            measured += f"<br>not measured: {_cell(r.not_measured)}"
        lines.append(f"| [`{name}`](recipes/{name}.md) | {_cell(r.claim)} | {measured or '—'} | "
                     f"{_cell(r.verdict())} | {_cell(r.scale_paper)} → {_cell(r.scale_here)} |")
    lines += ["", "## Commands", ""]
    lines += [f"- C{n}: `{command}`" for command, n in commands.items()]
    return "\n".join(lines) + "\n"


def missing_results(recipes: list[str], docs: Optional[Path] = None) -> list[str]:
    results = load_results(docs)
    return [name for name in recipes if name not in results]
