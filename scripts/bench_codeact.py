#!/usr/bin/env python
"""codeact (CDAS selection + Dynamic Pack) against ``sft`` on every conversation, on the built-in arithmetic.

Arms, each a shipped recipe run through the CLI (tiny Llama from scratch, CPU), every one with the same seeds:

* ``sft``: the ``sft`` recipe: all 4000 training conversations, rows packed in order, 150 steps;
* ``codeact``: the ``codeact`` recipe as it ships: CDAS keeps 40% of the conversations (top IFD per k-means cluster
  of the instructions), Dynamic Pack packs them, the same 150 steps (so more passes over fewer rows);
* ``codeact_same_passes``: the same selection trained for as many passes over its rows as ``sft`` makes over its
  own (fewer steps: the paper's set-up, where the saving in training time comes from);
* ``random_40``: a uniformly random 40% of the conversations, Dynamic Pack, 150 steps: what CDAS's choice adds over
  keeping the same number of conversations at random.

Figures come from the runs' ``metrics.jsonl`` / ``summary.json`` (scripts/bench_posttraining.py reads them):
held-out accuracy is ``methods.answer_accuracy`` (greedy answers to 64 held-out questions, exact match), eval loss
the next-token loss on the assistant tokens of the right answers, rows the packed training rows.

    OMP_NUM_THREADS=1 python scripts/bench_codeact.py --seeds 0 1
    OMP_NUM_THREADS=1 python scripts/bench_codeact.py --seeds 0 1 --write docs/benchmarks.md

Extra ``key=value`` arguments go to every run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from _sections import replace_marked_section, with_reading  # noqa: E402
from bench_posttraining import stage_figures  # noqa: E402

SECTION_START = "<!-- bench_codeact:start -->"
SECTION_END = "<!-- bench_codeact:end -->"
HEADING = "### codeact against sft on the built-in arithmetic"
ARMS: dict[str, list[str]] = {
    "sft": ["+recipe=sft"],
    "codeact": ["+recipe=codeact"],
    "codeact_same_passes": ["+recipe=codeact"],          # train.max_steps set from the sft and codeact runs
    "random_40": ["+recipe=codeact", "selection=random", "selection.target=null", "selection.budget.fraction=0.4",
                  "selection.budget.unit=examples"],
}


def same_passes_steps(sft: dict[str, Any], codeact: dict[str, Any]) -> int:
    """Steps that give ``codeact``'s rows as many passes as ``sft`` made over its own (rounded up)."""
    passes = sft["steps"] * sft["global_batch_size"] / sft["train_sequences"]
    return max(1, math.ceil(passes * codeact["train_sequences"] / codeact["global_batch_size"]))


def arm_table(rows: list[dict[str, Any]]) -> str:
    """One line per arm and seed: kept conversations, packed rows, steps, passes, accuracy and eval loss."""
    lines = ["| arm | seed | conversations | packed rows | steps | passes | held-out accuracy | eval loss (answers) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['seed']} | {r['conversations']} | {r['rows']} | {r['steps']} | "
                     f"{r['passes']:.2f} | {r['acc']:.3f} ({round(r['acc'] * r['questions'])} of {r['questions']}) | "
                     f"{r['loss']:.3f} |")
    return "\n".join(lines)


def mean_table(rows: list[dict[str, Any]]) -> str:
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    lines = ["| arm | mean held-out accuracy | mean eval loss | eval loss minus sft's, per seed |", "|---|---|---|---|"]
    sft = {r["seed"]: r["loss"] for r in rows if r["arm"] == "sft"}
    for arm in arms:
        mine = [r for r in rows if r["arm"] == arm]
        gaps = ", ".join(f"{r['loss'] - sft[r['seed']]:+.3f}" for r in mine if r["seed"] in sft)
        lines.append(f"| {arm} | {statistics.mean(r['acc'] for r in mine):.3f} | "
                     f"{statistics.mean(r['loss'] for r in mine):.3f} | {gaps if arm != 'sft' else '-'} |")
    return "\n".join(lines)


def run_arm(arm: str, seed: int, out: Path, extra: list[str], reuse: bool) -> dict[str, Any]:
    run = out / f"{arm}-seed{seed}"
    if not (reuse and (run / "summary.json").is_file()):
        subprocess.run([sys.executable, "-m", "effitrain.cli", *ARMS[arm], *extra, f"train.seed={seed}",
                        f"run_dir={run}", "overwrite=true", "logger.progress_bar=false"], cwd=REPO, check=True)
    summary = json.loads((run / "summary.json").read_text())
    figures = stage_figures(run)
    cfg_questions = _questions(run)
    selection = summary.get("selection") or {}
    return {"arm": arm, "seed": seed, "conversations": selection.get("kept_examples", _pool_size(run)),
            "rows": summary["train_sequences"], "steps": summary["steps"], "passes": summary["data_passes"],
            "global_batch_size": summary["global_batch_size"], "train_sequences": summary["train_sequences"],
            "acc": figures["acc_after"], "loss": figures["loss_after"], "questions": cfg_questions}


def _questions(run: Path) -> int:
    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    return int(cfg["methods"]["answer_accuracy"]["examples"])


def _pool_size(run: Path) -> int:
    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    return int(cfg["dataset"]["max_docs_per_domain"])


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1])
    parser.add_argument("--arms", nargs="*", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench_codeact")
    parser.add_argument("--reuse", action="store_true", help="read finished runs under --out instead of running")
    parser.add_argument("--write", type=Path, default=None, help="replace this script's section of the file")
    args, extra = parser.parse_known_args(argv)
    rows = []
    for seed in args.seeds:
        done: dict[str, dict[str, Any]] = {}
        for arm in args.arms:
            more = []
            if arm == "codeact_same_passes":
                for need in ("sft", "codeact"):
                    if need not in done:
                        done[need] = run_arm(need, seed, args.out, extra, args.reuse)
                more = [f"train.max_steps={same_passes_steps(done['sft'], done['codeact'])}"]
            done[arm] = done.get(arm) or run_arm(arm, seed, args.out, [*extra, *more], args.reuse)
            rows.append(done[arm])
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    text = arm_table(rows) + "\n\n" + mean_table(rows)
    print(text)
    if args.write:
        env = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if os.environ.get("OMP_NUM_THREADS") else ""
        cmd = env + "python scripts/bench_codeact.py " + " ".join(
            ["--seeds " + " ".join(map(str, args.seeds)),
             *(["--arms " + " ".join(args.arms)] if args.arms != list(ARMS) else []), *extra, f"--write {args.write}"])
        body = (f"{HEADING}\n\n{SECTION_START}\n"
                f"`codeact` selects and packs instruction data, so the pre-training pool above does not fit it; it is "
                f"compared with the `sft` recipe on the built-in arithmetic conversations (tiny Llama from scratch, "
                f"seeds {', '.join(map(str, args.seeds))}, CPU). Accuracy: `methods.answer_accuracy`, greedy answers to "
                f"the 64 held-out questions, exact match; eval loss: next-token loss on the assistant tokens of the "
                f"right answers; packed rows: the training rows of `dataset.seq_len` 128 tokens; passes: steps x 8 "
                f"rows / packed rows. Arms: `sft` (all conversations, packed in order), `codeact` (the recipe: 40% by "
                f"CDAS, Dynamic Pack, the same 150 steps), `codeact_same_passes` (the same selection, as many passes "
                f"as `sft` makes), `random_40` (`+recipe=codeact selection=random`: a random 40%, Dynamic Pack). "
                f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}.\n\n"
                f"```\n{cmd}\n```\n\n{text}\n")
        body = with_reading(body, __file__)
        body += f"{SECTION_END}\n"
        replace_marked_section(args.write, f"{HEADING}\n\n{SECTION_START}", SECTION_END, body)
        print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
