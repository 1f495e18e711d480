"""``effitrain report RUN_DIR... | SWEEP_DIR``: the runs' curves and final figures as one self-contained HTML page
(figures embedded as PNG data) and a Markdown page beside it (figures as files), for a pull request or a notebook.

What is read: each run's ``metrics.jsonl`` (train lines: loss, lr, tokens/s; eval lines: ``eval_loss`` and one
``eval_loss/DOMAIN`` per domain), ``summary.json`` (final figures, memory, time), ``recipes.yaml`` and the first line
of ``command.txt`` (for the label).  A sweep root contributes its members in ``sweep.json`` order; a multi-stage run
contributes its stages, each labelled ``run / stage``.  Runs are labelled by their recipes and by the overrides that
tell them apart (what all runs share is said once, above the table), and keep one colour in every panel.

Torch-free: matplotlib (the ``plot`` extra) is imported only to draw.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from effitrain.cluster.manifest import MANIFEST
from effitrain.registry import ConfigError

#: columns of the final-figures table: (summary key or derived name, header)
TABLE = [("steps", "steps"), ("tokens", "tokens"), ("final_train_loss", "final train loss"),
         ("final_eval_loss", "final eval loss"), ("tokens_per_s", "tokens/s"),
         ("training_state", "training state"), ("peak_memory", "peak memory"), ("train_seconds", "train time"),
         ("status", "status")]


@dataclass
class RunCurves:
    """One run as the report sees it."""
    path: Path
    recipes: list[str]
    overrides: list[str]
    summary: dict[str, Any]
    train: list[dict[str, Any]] = field(default_factory=list)   # metrics lines with a train loss
    evals: list[dict[str, Any]] = field(default_factory=list)   # metrics lines with eval_loss
    label: str = ""
    stage: Optional[str] = None
    notes: list[str] = field(default_factory=list)   # damaged files or lines left out, each naming its file

    @property
    def domains(self) -> list[str]:
        return sorted({k.split("/", 1)[1] for line in self.evals for k in line if k.startswith("eval_loss/")})


# ------------------------------------------------------------------------------------------------ reading
#: the numbers a metrics line or summary.json may hold; any other type there is damage, dropped with a note
NUMBER_KEYS = ("step", "tokens", "loss", "lr", "tokens_per_s", "peak_memory_bytes", "grad_norm", "step_time_s",
               "eval_loss", "steps", "final_eval_loss", "train_seconds", "final_train_loss")


def _is_number_key(key: str) -> bool:
    return key in NUMBER_KEYS or key.startswith("eval_loss/")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _numbers_only(record: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``record`` without the number keys whose values are not numbers; those keys, as ``key=value`` words."""
    bad = [k for k, v in record.items() if _is_number_key(k) and not _is_number(v)]
    return {k: v for k, v in record.items() if k not in bad}, [f"{k}={record[k]!r}"[:60] for k in bad]


def _lines_of(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8", errors="replace").splitlines()


def _read_metrics(path: Path) -> tuple[list[dict], list[dict], list[str]]:
    """Train lines, eval lines, and what was skipped (as one note naming the file and the first bad line)."""
    train, evals, skipped = [], [], []
    if not path.is_file():
        return train, evals, []
    raw_lines = _lines_of(path)
    last = max((i for i, raw in enumerate(raw_lines) if raw.strip()), default=-1)
    for i, raw in enumerate(raw_lines):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except json.JSONDecodeError:
            if i != last:  # a run killed mid-write leaves a partial last line: expected, not damage
                skipped.append(f"line {i + 1} is not JSON")
            continue
        if not isinstance(line, dict):
            skipped.append(f"line {i + 1} is a JSON {type(line).__name__}, not an object")
            continue
        line, bad = _numbers_only(line)
        if bad:
            skipped.append(f"line {i + 1} has {', '.join(bad)} (not a number)")
        if "loss" in line:
            train.append(line)
        if "eval_loss" in line:
            evals.append(line)
    notes = [f"{path}: {len(skipped)} damaged line(s) left out (first: {skipped[0]})"] if skipped else []
    return train, evals, notes


def _read_summary(path: Path) -> tuple[dict[str, Any], list[str]]:
    if not path.is_file():
        return {}, []
    try:
        summary = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except json.JSONDecodeError as exc:
        return {}, [f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}; truncated?); "
                    f"the run's final figures come from metrics.jsonl"]
    if not isinstance(summary, dict):
        return {}, [f"{path}: holds a JSON {type(summary).__name__}, not an object; the run's final figures come "
                    f"from metrics.jsonl"]
    summary, bad = _numbers_only(summary)
    return summary, [f"{path}: {', '.join(bad)} left out (not a number)"] if bad else []


def _overrides_of(run_dir: Path, given: Optional[list[str]] = None) -> list[str]:
    if given is not None:
        words = [str(w) for w in given] if isinstance(given, list) else []
    else:
        command = run_dir / "command.txt"
        lines = _lines_of(command) if command.is_file() else []
        first = lines[0] if lines else ""
        try:
            words = shlex.split(first)
        except ValueError:
            words = first.split()
    # the recipes label a run by name; where it ran and how it was resumed do not tell runs apart
    skipped = ("recipe=", "run_dir=", "hydra.", "resume=", "overwrite=")
    return [w for w in words if "=" in w and not w.lstrip("+~").startswith(skipped)]


def _recipes_of(run_dir: Path, notes: list[str]) -> list[str]:
    import yaml

    path = run_dir / "recipes.yaml"
    if not path.is_file():
        return []
    try:
        rows = yaml.safe_load(path.read_text(encoding="utf-8", errors="replace")) or []
    except yaml.YAMLError:
        notes.append(f"{path}: not valid YAML; the run is labelled without its recipes")
        return []
    return [str(r.get("name", "?")) for r in (rows if isinstance(rows, list) else []) if isinstance(r, dict)]


def _read_run(run_dir: Path, overrides: Optional[list[str]] = None, stage: Optional[str] = None) -> RunCurves:
    summary, notes = _read_summary(run_dir / "summary.json")
    train, evals, metric_notes = _read_metrics(run_dir / "metrics.jsonl")
    recipes = _recipes_of(run_dir, notes)
    return RunCurves(run_dir, recipes, _overrides_of(run_dir, overrides), summary, train, evals,
                     stage=stage, notes=[*notes, *metric_notes])


def _is_run(path: Path) -> bool:
    return (path / "metrics.jsonl").is_file() or (path / "summary.json").is_file()


def _sweep_members(root: Path, notes: list[str]) -> list[tuple[Path, Optional[list[str]]]]:
    """The member folders of a sweep root with their overrides, in sweep.json's order; from a damaged sweep.json,
    the numbered subfolders that hold runs (Hydra names a sweep's members 0, 1, ...)."""
    manifest = root / MANIFEST
    try:
        members = json.loads(manifest.read_text(encoding="utf-8", errors="replace")).get("members", [])
        if not isinstance(members, list):
            raise TypeError
    except (json.JSONDecodeError, AttributeError, TypeError):
        found = sorted((p for p in root.iterdir() if p.is_dir() and p.name.isdigit() and _is_run(p)),
                       key=lambda p: int(p.name))
        notes.append(f"{manifest}: damaged (not a JSON object with a members list); reporting the {len(found)} "
                     f"run(s) in its numbered subfolders, labelled by their command.txt")
        return [(p, None) for p in found]
    out = []
    for k, entry in enumerate(members):
        if not isinstance(entry, dict) or not isinstance(entry.get("dir"), str):
            notes.append(f"{manifest}: member {k} names no folder ('dir'); left out")
            continue
        member_dir = Path(entry["dir"])
        if not member_dir.is_absolute() and not member_dir.exists():
            member_dir = root / member_dir
        overrides = entry.get("overrides")
        out.append((member_dir, overrides if isinstance(overrides, list) else None))
    return out


def collect(paths: list[Path], notes: Optional[list[str]] = None) -> list[RunCurves]:
    """The runs under ``paths`` (run directories, sweep roots, multi-stage runs), in the order given.  Damaged files
    are left out with a line in ``notes`` (and in each run's own ``notes``); the rest is still reported."""
    from effitrain.fsutil import why_missing

    notes = [] if notes is None else notes
    runs: list[RunCurves] = []
    for path in paths:
        if not path.is_dir():
            if not path.exists():
                raise ConfigError(f"report: '{path}' {why_missing(path)}")
            raise ConfigError(f"report: '{path}' is not a folder; give run directories (holding metrics.jsonl) "
                              f"or a sweep root (holding {MANIFEST})")
        if (path / MANIFEST).is_file():
            for member_dir, overrides in _sweep_members(path, notes):
                if _is_run(member_dir):
                    runs.append(_read_run(member_dir, overrides))
        elif (path / "stages").is_dir() and not (path / "metrics.jsonl").is_file():
            for stage_dir in sorted(p for p in (path / "stages").iterdir() if _is_run(p)):
                run = _read_run(stage_dir, _overrides_of(path), stage=stage_dir.name)
                run.recipes = _recipes_of(path, run.notes) or run.recipes
                runs.append(run)
        elif _is_run(path):
            runs.append(_read_run(path))
        else:
            raise ConfigError(f"report: '{path}' holds no run (no metrics.jsonl or summary.json) and no sweep "
                              f"({MANIFEST})")
    if not runs:
        raise ConfigError(f"report: no run with metrics under {', '.join(map(str, paths))}")
    notes += [note for run in runs for note in run.notes]
    _label(runs)
    return runs


def _label(runs: list[RunCurves]) -> None:
    """Recipes plus the overrides that differ between the runs; the folder's name where that is still ambiguous."""
    shared = set.intersection(*(set(r.overrides) for r in runs)) if len(runs) > 1 else set()
    for run in runs:
        own = [o for o in run.overrides if o not in shared]
        words = ["+".join(run.recipes) or "default", *own]
        run.label = " ".join(words) + (f" / {run.stage}" if run.stage else "")
    seen: dict[str, int] = {}
    for run in runs:
        seen[run.label] = seen.get(run.label, 0) + 1
    for run in runs:
        if seen[run.label] > 1:
            run.label = f"{run.label} ({run.path.name})"


def shared_overrides(runs: list[RunCurves]) -> list[str]:
    if len(runs) < 2:
        return runs[0].overrides if runs else []
    shared = set.intersection(*(set(r.overrides) for r in runs))
    return [o for o in runs[0].overrides if o in shared]


# ------------------------------------------------------------------------------------------------ the table
def _status(summary: dict[str, Any], damaged: bool = False) -> str:
    if not summary:
        return "summary.json damaged" if damaged else "running or failed before its summary"
    if summary.get("finished"):
        return "finished"
    return f"stopped: {summary.get('stopped_by') or summary.get('failed') or 'unknown'}"


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "—"
    seconds = float(seconds)
    return f"{seconds:.1f} s" if seconds < 60 else f"{int(seconds // 60)} min {seconds % 60:02.0f} s"


def _bytes(n: Optional[float]) -> str:
    if not n:
        return "—"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def table_rows(runs: list[RunCurves]) -> list[list[str]]:
    """One row per run: the label and the TABLE columns, formatted."""
    rows = []
    for run in runs:
        s = run.summary
        last_train = run.train[-1] if run.train else {}
        peak = max((line.get("peak_memory_bytes", 0) for line in run.train), default=0) or s.get("peak_memory_bytes")
        values = {
            "steps": f"{s.get('steps', last_train.get('step', 0)):,}",
            "tokens": f"{s.get('tokens', last_train.get('tokens', 0)):,}",
            "final_train_loss": f"{last_train['loss']:.4f}" if "loss" in last_train else "—",
            "final_eval_loss": f"{s['final_eval_loss']:.4f}" if s.get("final_eval_loss") is not None else
            (f"{run.evals[-1]['eval_loss']:.4f}" if run.evals else "—"),
            "tokens_per_s": f"{s['tokens_per_s']:,.0f}" if s.get("tokens_per_s") else "—",
            # weights + gradients + optimizer state, from the tensors: what a memory-saving method changes
            "training_state": _bytes(s.get("training_state_bytes")),
            # the process's peak (RSS on a CPU, which includes the libraries and data; allocated memory on a GPU)
            "peak_memory": _bytes(peak),
            "train_seconds": _duration(s.get("train_seconds")),
            "status": _status(s, damaged=any("summary.json" in note for note in run.notes)),
        }
        rows.append([run.label, *(values[key] for key, _ in TABLE)])
    return rows


# ------------------------------------------------------------------------------------------------ the figures
def _colours(runs: list[RunCurves]) -> dict[str, Any]:
    import matplotlib

    cycle = matplotlib.colormaps["tab10" if len(runs) <= 10 else "tab20"]
    return {run.label: cycle(i % cycle.N) for i, run in enumerate(runs)}


def _panel(ax, runs, colours, x_key, y_key, source, *, title, xlabel, ylabel, log_y=False) -> bool:
    drawn = False
    for run in runs:
        points = [(line[x_key], line[y_key]) for line in getattr(run, source) if y_key in line and x_key in line]
        if not points:
            continue
        xs, ys = zip(*points)
        ax.plot(xs, ys, label=run.label, color=colours[run.label], linewidth=1.4,
                marker="o" if len(xs) <= 12 else None, markersize=3)
        drawn = True
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if log_y and drawn:
        ax.set_yscale("log")
    return drawn


def figures(runs: list[RunCurves]) -> dict[str, bytes]:
    """name -> PNG bytes: losses (by step and by tokens), eval losses per domain, learning rate, throughput."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    colours = _colours(runs)
    out: dict[str, bytes] = {}

    def finish(fig, name: str, axes) -> None:
        handles, labels = axes[0].get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3), fontsize=8, frameon=False,
                       bbox_to_anchor=(0.5, 0.0))
            fig.tight_layout(rect=(0, 0.06 + 0.035 * ((len(labels) - 1) // 3), 1, 1))
        else:
            fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110)
        plt.close(fig)
        out[name] = buffer.getvalue()

    def side_by_side(name: str, left: tuple, right: tuple) -> None:
        """Two panels, each (x key, y key, title, x label, y label) over the train lines."""
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, (x, y, title, xlabel, ylabel) in zip(axes, (left, right)):
            _panel(ax, runs, colours, x, y, "train", title=title, xlabel=xlabel, ylabel=ylabel)
        finish(fig, name, axes)

    side_by_side("loss", ("step", "loss", "train loss by step", "optimizer step", "loss (nats/token)"),
                 ("tokens", "loss", "train loss by tokens", "training tokens", "loss (nats/token)"))

    domains = sorted({d for run in runs for d in run.domains})
    panels = ["eval_loss", *(f"eval_loss/{d}" for d in domains)]
    cols = min(len(panels), 3)
    rows = (len(panels) + cols - 1) // cols
    fig, grid = plt.subplots(rows, cols, figsize=(4.0 * cols, 3.3 * rows), squeeze=False)
    flat = list(grid.flat)
    for ax, key in zip(flat, panels):
        _panel(ax, runs, colours, "tokens", key, "evals", title="eval loss (all domains)" if key == "eval_loss"
               else f"eval loss: {key.split('/', 1)[1]}", xlabel="training tokens", ylabel="loss (nats/token)")
    for ax in flat[len(panels):]:
        ax.set_visible(False)
    finish(fig, "eval_loss", flat)

    side_by_side("lr_throughput", ("step", "lr", "learning rate", "optimizer step", "learning rate"),
                 ("step", "tokens_per_s", "throughput", "optimizer step", "tokens/s"))
    return out


# ------------------------------------------------------------------------------------------------ the pages
FIGURE_TITLES = {"loss": "Training loss", "eval_loss": "Held-out loss, overall and per domain",
                 "lr_throughput": "Learning rate and throughput"}


#: marks a folder as an effitrain report: only such a folder (or a new or empty one) is written into
REPORT_MARKER = ".effitrain-report"


def check_out_dir(out_dir: Path) -> None:
    """Refuse an ``--out`` that is a file, or a folder of other files: a report replaces only an earlier report's
    own files (``report.md``, ``report.html``, the PNGs), never a user's."""
    from effitrain.fsutil import why_missing

    if os.path.lexists(out_dir) and not out_dir.exists():
        raise ConfigError(f"report: --out '{out_dir}' {why_missing(out_dir)}")
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"report: --out '{out_dir}' is a file; name a folder for report.html, report.md and the "
                          f"figures")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / REPORT_MARKER).is_file():
        names = sorted(p.name for p in out_dir.iterdir())
        raise ConfigError(f"report: --out '{out_dir}' is not empty and is not an earlier effitrain report (it holds "
                          f"{', '.join(names[:3])}{', ...' if len(names) > 3 else ''}); effitrain never overwrites "
                          f"files it did not write; choose another --out")
    anchor = out_dir.absolute()
    while not anchor.exists() and anchor != anchor.parent:
        anchor = anchor.parent
    if not anchor.is_dir():
        raise ConfigError(f"report: --out '{out_dir}' lies below '{anchor}', which is a file")


def write_report(runs: list[RunCurves], out_dir: Path, *, title: str = "effitrain report",
                 notes: Optional[list[str]] = None) -> tuple[Path, Path]:
    """``out_dir/report.html`` (self-contained) and ``out_dir/report.md`` with its PNG files; returns both paths.
    ``out_dir`` must pass :func:`check_out_dir`; it is marked as a report before anything else is written."""
    check_out_dir(out_dir)
    notes = list(notes or [])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / REPORT_MARKER).write_text("an effitrain report: 'effitrain report --out' may replace its files\n")
    pngs = figures(runs)
    rows = table_rows(runs)
    headers = ["run", *(h for _, h in TABLE)]
    shared = shared_overrides(runs)
    for name, data in pngs.items():
        (out_dir / f"{name}.png").write_bytes(data)

    md = [f"# {title}", "", f"{len(runs)} run(s)." + (f" Shared overrides: `{' '.join(shared)}`." if shared else ""),
          "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    md += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    md += ["", *(line for name in pngs for line in (f"## {FIGURE_TITLES[name]}", "", f"![{name}]({name}.png)", ""))]
    md += ["Folders: " + ", ".join(f"`{r.path}`" for r in runs), ""]
    if notes:
        md += ["Left out (damaged):", "", *(f"- {note}" for note in notes), ""]
    md_path = out_dir / "report.md"
    md_path.write_text("\n".join(md))

    esc = html.escape
    body = [f"<h1>{esc(title)}</h1>",
            f"<p>{len(runs)} run(s)." + (f" Shared overrides: <code>{esc(' '.join(shared))}</code>." if shared else "")
            + "</p>",
            "<table><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in headers) + "</tr></thead><tbody>"]
    body += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows]
    body += ["</tbody></table>"]
    for name, data in pngs.items():
        encoded = base64.b64encode(data).decode("ascii")
        body += [f"<h2>{esc(FIGURE_TITLES[name])}</h2>",
                 f'<img class="figure" id="fig-{name}" alt="{esc(FIGURE_TITLES[name])}" '
                 f'src="data:image/png;base64,{encoded}">']
    body += ["<p class='folders'>Folders: " + ", ".join(f"<code>{esc(str(r.path))}</code>" for r in runs) + "</p>"]
    if notes:
        body += ["<p class='folders'>Left out (damaged):</p><ul class='folders'>"
                 + "".join(f"<li>{esc(note)}</li>" for note in notes) + "</ul>"]
    page = ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>{esc(title)}</title><style>"
            "body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}"
            "table{border-collapse:collapse;font-size:0.9em}th,td{border:1px solid #ccc;padding:4px 8px;"
            "text-align:right}th:first-child,td:first-child{text-align:left}thead{background:#f3f3f3}"
            "img.figure{max-width:100%;display:block;margin:0.5em 0 1.5em}code{background:#f6f6f6}"
            ".folders{font-size:0.8em;color:#666}"
            "</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    html_path = out_dir / "report.html"
    html_path.write_text(page)
    return html_path, md_path


def default_out_dir(paths: list[Path]) -> Path:
    """One folder given: its ``report/``; several: ``outputs/report``."""
    return paths[0] / "report" if len(paths) == 1 else Path("outputs") / "report"
