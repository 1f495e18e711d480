"""``effitrain plan``: what a run will do over its steps, as a table (and a figure), without building anything.

:func:`plan_section` validates a composed config, resolves its timeline for the run's length and batch, and returns
one row per breakpoint: the step, the tokens seen before it, the fraction of ``train.max_steps``, and the value of
every quantity there (lr from the configured scheduler block, the sequence length the model sees, the mixture
weights, the phase).  A multi-stage recipe is a list of sections, one per stage (:func:`plan_sections`); steps and
tokens count from the start of each stage.  Torch-free: the lr curves come
from :mod:`effitrain.optim.lr_curves`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from effitrain.timeline import Timeline


@dataclass
class PlanSection:
    title: str
    max_steps: int
    world_size: int
    tokens_per_step: int
    packed_seq_len: int
    timeline: Timeline
    lr: Optional[Callable[[int], float]]   # the absolute lr at a step (None: the scheduler block gives no curve)
    rows: list[dict]
    notes: list[str] = field(default_factory=list)  # lines printed under the table (what the columns cannot show)
    step_unit: Optional[str] = None  # what one step trains on, where that is not packed rows (pairs, prompts)
    warmup_steps: int = 0  # the scheduler's warm-up (the annealing law counts it at the peak lr)

    def value_at(self, name: str, step: int) -> Any:
        """A quantity as the run sees it at ``step`` (defaults where the timeline declares nothing)."""
        if name == "lr":
            return self.lr(step) if self.lr else None
        if name == "seq_len":
            return self.timeline.value("seq_len", step) if self.timeline.declares("seq_len") else self.packed_seq_len
        if name == "mixture":
            return self.timeline.value("mixture", step) if self.timeline.declares("mixture") else None
        if name == "phase":
            return self.timeline.phase(step)
        if name in ("competence", "distill_weight"):
            return self.timeline.value(name, step) if self.timeline.declares(name) else None
        raise KeyError(name)


@dataclass
class SynthesisPlan:
    """A synthesis stage in the plan: no steps, what it reads and asks a generator for."""
    title: str
    counts: dict[str, Any]
    rows: list[dict] = field(default_factory=list)  # no training steps (plan_rows reads every section's rows)

    def lines(self) -> list[str]:
        c = self.counts
        return [self.title,
                f"  documents in   {c['documents']:,}",
                f"  words in       {c['words']:,} in {c['pieces']:,} pieces",
                f"  requests       {c['requests']:,}"
                + (f" + at most {c['follow_ups']:,} follow-ups" if c.get("follow_ups") else "")
                + f" ({'at most ' if c.get('follow_ups') else ''}{c['samples']:,} samples)",
                f"  tokens out     at most {c['max_tokens_out']:,}",
                f"  domains out    {', '.join(c['domains_out'])}"]


def _synthesis_plan(stage: Any, spec: Any) -> SynthesisPlan:
    from effitrain.generation.synthesis import planned_counts

    raw = stage.synthesis
    generator = raw.get("generator") or {}
    params = spec.synthesis
    title = (f"stage {stage.index} '{stage.name}' (synthesis: rollout {params.rollout_block.name}, generator "
             f"{params.generator_block.name} {generator.get('model')}; trains nothing)")
    return SynthesisPlan(title, planned_counts(spec))


def plan_sections(cfg: Mapping[str, Any], recipes: Optional[list] = None) -> list[PlanSection]:
    """One section per stage of a multi-stage recipe (each stage is a whole run with its own timeline and lr), or
    one for a single run."""
    from effitrain.config.spec import validate

    spec = validate(cfg, recipes)
    if spec.stages:
        return [_synthesis_plan(stage, one) if stage.synthesis is not None else _section(one, f"stage {stage.index} '{stage.name}' (init {stage.init}"
                              + (f", transform {stage.transform.get('name')}" if stage.transform else "")
                              # what a sweep decides is known only after it ran: the rows show the recipe's stand-in
                              + (f", sweep {stage.sweep.get('name')}: one run per member" if stage.sweep else "")
                              + (f", keys concluded by stage '{stage.config_from}' replace the values shown"
                                 if stage.config_from else "") + ")")
                for stage, one in zip(spec.stages, spec.stage_specs)]
    return [_section(spec, " + ".join(r.name for r in spec.recipes) or "run")]


def plan_section(cfg: Mapping[str, Any], recipes: Optional[list] = None, *, title: str = "run") -> PlanSection:
    """The plan of a single run (a multi-stage recipe: see :func:`plan_sections`)."""
    from effitrain.config.spec import validate

    spec = validate(cfg, recipes)
    if title == "run" and spec.recipes:
        title = " + ".join(r.name for r in spec.recipes)
    return _section(spec, title)


def _section(spec: Any, title: str) -> PlanSection:
    t = spec.train
    world = t.global_batch_size // (t.micro_batch_size * t.grad_accum) if t.global_batch_size else 1
    seq_len = int(spec.block("dataset").params.seq_len)
    tokens_per_step = t.micro_batch_size * t.grad_accum * world * seq_len
    timeline = spec.timeline.resolve(max_steps=t.max_steps, tokens_per_step=tokens_per_step)

    scheduler = spec.block("scheduler").params
    peak = getattr(spec.block("optimizer").params, "lr", None)
    curve = scheduler.multiplier(t.max_steps, timeline) if hasattr(scheduler, "multiplier") else None
    lr = (lambda step: peak * curve(step)) if curve is not None and peak is not None else None

    marks: dict[int, list[str]] = {0: ["start"]}
    for name, points in timeline.points.items():
        for step, _ in points[1:]:
            marks.setdefault(step, []).append(name)
    for name, start, end in timeline.phases:
        marks.setdefault(start, []).append(f"phase {name} starts")
        if end < t.max_steps:
            marks.setdefault(end, []).append(f"phase {name} ends")
    if curve is not None and not timeline.declares("lr"):
        for step in getattr(curve, "breakpoints", lambda: [])():
            if 0 < step < t.max_steps:
                marks.setdefault(step, []).append(f"{spec.block('scheduler').name} lr")
    marks.setdefault(t.max_steps - 1, []).append("last step")
    notes = _curriculum_notes(spec, marks, seq_len)
    objective = spec.block("objective").params
    mixed = hasattr(objective, "plan_weights")  # objective: mixed, its components' weights over the stage
    if mixed:
        for step, what in objective.plan_marks(t.max_steps).items():
            marks.setdefault(step, []).append(what)
        notes += objective.plan_notes()

    section = PlanSection(title, t.max_steps, world, tokens_per_step, seq_len, timeline, lr, [], notes,
                          step_unit=_step_unit(spec, t.micro_batch_size * t.grad_accum * world, seq_len),
                          warmup_steps=int(getattr(scheduler, "warmup_steps", 0) or 0))
    for step in sorted(s for s in marks if 0 <= s < t.max_steps):
        section.rows.append({"step": step, "tokens": step * tokens_per_step, "fraction": step / t.max_steps,
                             "lr": section.value_at("lr", step), "seq_len": section.value_at("seq_len", step),
                             "mixture": section.value_at("mixture", step), "phase": section.value_at("phase", step),
                             "competence": section.value_at("competence", step),
                             "distill_weight": section.value_at("distill_weight", step),
                             "objective_weights": objective.plan_weights(step, timeline) if mixed else None,
                             "what": ", ".join(marks[step])})
    return section


def _step_unit(spec: Any, rows: int, seq_len: int) -> Optional[str]:
    """An objective that trains on something other than packed rows (preference pairs, prompts answered by sampled
    groups) says what a step holds; the others train on packed rows, which the header says by default."""
    describe = getattr(spec.block("objective").params, "step_description", None)
    return describe(rows, seq_len) if describe is not None else None


def _curriculum_notes(spec: Any, marks: dict[int, list[str]], seq_len: int) -> list[str]:
    """A curriculum whose sequence length is drawn per step (dataset_decomposition): its cycle starts as marks,
    and a note that the seq_len column is the packed row length, not the length of every step."""
    curriculum = spec.block("curriculum")
    if curriculum.name != "dataset_decomposition":
        return []
    import math

    max_steps = spec.train.max_steps
    per_cycle = max(1, math.ceil(max_steps / curriculum.params.cycles))
    for k, step in enumerate(range(per_cycle, max_steps, per_cycle), start=2):
        marks.setdefault(step, []).append(f"decomposition cycle {k}")
    low = spec.block("dataset").params.min_piece_len
    return [f"seq_len: dataset_decomposition draws one length bucket ({low}..{seq_len}) per step, short ones first "
            f"in each cycle of {per_cycle} steps (the column shows the packed row length)"]


def load_law(path: str | Path) -> Any:
    """A fitted annealing law (``anneal_law`` stage's ``concluded.yaml``, whose ``record.law`` holds it, or a YAML
    mapping of ``L0, A, alpha, C[, decay_factor]``)."""
    import yaml

    from effitrain.curriculum.anneal_law import AnnealLaw
    from effitrain.registry import ConfigError

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"plan: --law '{path}' is not a file; give the concluded.yaml of an anneal_law stage, "
                          f"e.g. --law outputs/run/stages/01-fit/concluded.yaml")
    try:
        data = yaml.safe_load(p.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"plan: --law '{path}' is not readable YAML ({type(exc).__name__})") from None
    if isinstance(data, dict) and isinstance(data.get("record"), dict) and isinstance(data["record"].get("law"), dict):
        data = data["record"]["law"]
    if not isinstance(data, dict):
        raise ConfigError(f"plan: --law '{path}' holds no fitted law (a mapping with L0, A, alpha, C)")
    return AnnealLaw.from_dict(data, f"plan: --law '{path}'")


def add_law_predictions(sections: list, law: Any) -> None:
    """The loss the annealing law predicts at each row's step and at the last step of every section with an lr
    curve (a ``predicted_loss`` per row, and a note under the table)."""
    from effitrain.curriculum.anneal_law import predict

    for section in sections:
        if isinstance(section, SynthesisPlan):
            continue
        if section.lr is None:
            section.notes.append("anneal_law: no prediction (the scheduler block gives no lr curve)")
            continue
        lrs = [section.lr(step) for step in range(section.max_steps)]
        losses = predict(law, lrs, warmup_steps=section.warmup_steps)
        for row in section.rows:  # the row of step s shows the lr of step s: the loss after it
            row["predicted_loss"] = float(losses[row["step"]])
        section.notes.append(
            f"anneal_law: predicted loss after step {section.max_steps}: {losses[-1]:.4f} "
            f"(L = {law.L0:.4g} + {law.A:.4g}*S1^-{law.alpha:.4g} - {law.C:.4g}*S2, decay {law.decay_factor}); "
            "by row: " + ", ".join(f"{r['step']}: {r['predicted_loss']:.4f}" for r in section.rows))


def plan_rows(cfg: Mapping[str, Any], recipes: Optional[list] = None) -> list[dict]:
    """The plan as rows (see :func:`plan_section`); a multi-stage recipe's rows carry their stage's title in
    ``section``."""
    return [{"section": sec.title, **row} for sec in plan_sections(cfg, recipes) for row in sec.rows]


def format_section(section: PlanSection) -> str:
    if isinstance(section, SynthesisPlan):
        return "\n".join(section.lines())
    domains = sorted({d for r in section.rows if r["mixture"] for d in r["mixture"]})
    paced = section.timeline.declares("competence")  # a difficulty curriculum: the share of sorted rows in play
    distilled = section.timeline.declares("distill_weight")  # SALT: the teacher's weight in the loss
    components = list(section.rows[0].get("objective_weights") or {}) if section.rows else []
    header = ["step", "tokens", "fraction", "lr", "seq_len"] + [f"w[{d}]" for d in domains] + \
        (["competence"] if paced else []) + (["distill_weight"] if distilled else []) + \
        [f"objective[{c}]" for c in components] + ["phase", "what"]
    table = [header]
    for r in section.rows:
        table.append([str(r["step"]), f"{r['tokens']:,}", f"{r['fraction']:.3f}",
                      "?" if r["lr"] is None else f"{r['lr']:.3g}", str(r["seq_len"])]
                     + [f"{r['mixture'].get(d, 0.0):.3g}" for d in domains]
                     + ([f"{r['competence']:.3f}"] if paced else [])
                     + ([f"{r['distill_weight']:.3g}"] if distilled else [])
                     + [r["objective_weights"][c] for c in components]
                     + [r["phase"] or "-", r["what"]])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    unit = section.step_unit or f"packed rows of {section.packed_seq_len} tokens"
    lines = [f"{section.title}: {section.max_steps} steps x {section.tokens_per_step:,} tokens "
             f"(world size {section.world_size}, {unit})"]
    for i, row in enumerate(table):
        lines.append("  ".join(c.rjust(w) if j < len(header) - 2 else c.ljust(w)
                               for j, (c, w) in enumerate(zip(row, widths))).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    if section.timeline.phases:
        lines.append("phases: " + "; ".join(f"{n} [{a}, {b})" for n, a, b in section.timeline.phases))
    lines += section.notes
    return "\n".join(lines)


def check_plot_path(path: str | Path) -> Path:
    """The ``--plot`` file: its folder is made if missing; a folder in its place, a file on the way, a symlink loop
    or a read-only place is one line (matplotlib would fail after the plan is printed, with a traceback)."""
    from effitrain.fsutil import why_missing
    from effitrain.registry import ConfigError

    path = Path(path)
    if os.path.lexists(path) and not path.exists():
        raise ConfigError(f"plan: --plot '{path}' {why_missing(path)}")
    if path.is_dir():
        raise ConfigError(f"plan: --plot '{path}' is a folder; name the .png file to write")
    anchor = path.absolute().parent
    while not anchor.exists() and anchor != anchor.parent:
        anchor = anchor.parent
    if not anchor.is_dir():
        raise ConfigError(f"plan: --plot '{path}' lies below '{anchor}', which is a file")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise ConfigError(f"plan: --plot '{path}': cannot write in '{anchor}' (read-only or not yours)")
    return path


def plan_figure(sections: list[PlanSection]) -> Any:
    """One panel per quantity (lr, sequence length, mixture weights) against the optimizer step; phases shaded.
    A multi-stage recipe's stages follow one another on the step axis; each panel's y range covers every stage."""
    import matplotlib
    matplotlib.use("Agg")  # a file, never a window
    import matplotlib.pyplot as plt

    panels = ["lr", "seq_len"] + (["mixture"] if any(s.timeline.declares("mixture") for s in sections) else [])
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.4 * len(panels)), sharex=True, squeeze=False)
    highest: dict[str, float] = {}
    peaks = [max(lrs) for lrs in ([s.value_at("lr", k) for k in range(s.max_steps)] for s in sections)
             if lrs and None not in lrs and max(lrs) > 0]
    offset = 0
    for section in sections:
        steps = list(range(section.max_steps))
        x = [offset + s for s in steps]
        for ax, name in zip(axes[:, 0], panels):
            if name == "mixture":
                if section.timeline.declares("mixture"):
                    domains = sorted({d for _, w in section.timeline.points["mixture"] for d in w})
                    for d in domains:
                        ax.step(x, [section.value_at("mixture", s).get(d, 0.0) for s in steps], where="post",
                                label=d)
                    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")
            else:
                ys = [section.value_at(name, s) for s in steps]
                if all(y is not None for y in ys):
                    ax.plot(x, ys, drawstyle="steps-post" if name == "seq_len" else "default")
                    highest[name] = max(highest.get(name, 0.0), max(ys))
            for k, (phase, a, b) in enumerate(section.timeline.phases):
                ax.axvspan(offset + a, offset + b, alpha=0.10, color=("C7", "C8", "C9")[k % 3])
                if name == panels[0]:
                    ax.text(offset + a, 1.0, f" {phase}", transform=ax.get_xaxis_transform(), va="top",
                            fontsize="small")
        if len(sections) > 1:  # stage boundaries: steps count on across stages in the figure
            for ax in axes[:, 0]:
                ax.axvline(offset, color="k", lw=0.8, ls="--")
            axes[0, 0].text(offset, 1.0, f" {section.title.split(' (')[0]}", transform=axes[0, 0].get_xaxis_transform(),
                            va="bottom", fontsize="small")
        offset += section.max_steps
    labels = {"lr": "learning rate", "seq_len": "sequence length\n(tokens)", "mixture": "domain weight"}
    for ax, name in zip(axes[:, 0], panels):
        ax.set_ylabel(labels[name])
        ax.grid(alpha=0.3)
        if name == "lr" and len(peaks) > 1 and max(peaks) > 10 * min(peaks):
            # stages whose peaks differ by orders of magnitude (SFT 3e-3, RL 3e-5): on a linear axis the smaller
            # ones are a flat line at the bottom, so a log axis down to a hundredth of the smallest peak
            ax.set_yscale("log")
            ax.set_ylim(bottom=min(peaks) / 100, top=max(peaks) * 2)
            ax.set_ylabel("learning rate\n(log scale)")
        elif name in highest:  # once, over all stages: a per-stage limit would cut off the stages before the last
            ax.set_ylim(bottom=0, top=highest[name] * 1.1 if highest[name] > 0 else 1)
    last = sections[-1]
    axes[-1, 0].set_xlabel(f"optimizer step ({last.tokens_per_step:,} tokens per step)" if len(sections) == 1
                           else "optimizer step, counted across the stages")
    fig.suptitle(sections[0].title if len(sections) == 1 else f"{len(sections)} stages")
    fig.tight_layout()
    return fig


def plot_sections(sections: list[PlanSection], path: str | Path) -> Path:
    """Draw :func:`plan_figure` into ``path`` (a PNG), making its folder if missing."""
    import matplotlib.pyplot as plt

    path = check_plot_path(path)
    fig = plan_figure([s for s in sections if isinstance(s, PlanSection)])  # a synthesis stage has no steps
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
