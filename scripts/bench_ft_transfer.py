#!/usr/bin/env python
"""Fine-tuning transfer (recipe ft_transfer) on the built-in arithmetic, tiny Llama, CPU: does the diff vector of a
fine-tuning of base_v1 carry the fine-tuning over to base_v2, and is base_v2 + diff a better start for fine-tuning?

Runs the ``ft_transfer`` recipe (base_v1 -> ft_v1 -> base_v2 -> transfer + 50 steps of sft), then the control: the
same 50 steps of sft from base_v2 itself (stage ``transfer`` without its transform, started from base_v2's folder).
Every number is read from the runs' ``metrics.jsonl``: ``eval_loss`` is the next-token loss on the assistant tokens
of the held-out right answers, ``eval_accuracy`` is ``methods.answer_accuracy`` (greedy answers to 64 held-out
questions, exact match).  Step 0 of a fine-tuning stage is its starting model before any update.

    OMP_NUM_THREADS=1 python scripts/bench_ft_transfer.py [--seeds 0 1] [--write]

``--write`` replaces the marked section of docs/benchmarks.md.  Extra ``key=value`` arguments go to every run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
START, END = "<!-- bench_ft_transfer:start -->", "<!-- bench_ft_transfer:end -->"


def _evals(run: Path) -> dict[int, dict]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m for m in lines if "eval_accuracy" in m}


def _run(args: list[str]) -> None:
    subprocess.run([sys.executable, "-m", "effitrain.cli", *args, "logger.progress_bar=false", "overwrite=true"],
                   cwd=REPO, check=True)


def one_seed(seed: int, out: Path, extra: list[str]) -> dict[str, tuple[float, float]]:
    pipeline = out / f"ft_transfer-seed{seed}"
    _run(["+recipe=ft_transfer", f"train.seed={seed}", f"run_dir={pipeline}", *extra])
    stages = pipeline / "stages"
    control = out / f"from_base_v2-seed{seed}"
    # the transfer stage's own settings (recipe ft_transfer, stage 4), from base_v2 without the diff vector
    _run(["+recipe=sft", f"model=pretrained", f"model.path={stages / '03-base_v2' / 'final_model'}",
          "train.max_steps=50", "train.eval_every=25", "scheduler.warmup_steps=5", f"train.seed={seed}",
          f"run_dir={control}", *extra])
    ft_v1, transfer, plain = _evals(stages / "02-ft_v1"), _evals(stages / "04-transfer"), _evals(control)

    def pick(evals: dict[int, dict], step: int) -> tuple[float, float]:
        return evals[step]["eval_loss"], evals[step]["eval_accuracy"]

    return {"ft_v1 (base_v1 fine-tuned 150 steps)": pick(ft_v1, max(ft_v1)),
            "base_v2, not fine-tuned": pick(plain, 0),
            "base_v2 + (ft_v1 - base_v1), not fine-tuned": pick(transfer, 0),
            "base_v2 fine-tuned 50 steps": pick(plain, max(plain)),
            "base_v2 + diff, fine-tuned 50 steps": pick(transfer, max(transfer))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench_ft_transfer")
    parser.add_argument("--write", action="store_true", help="replace the section in docs/benchmarks.md")
    args, extra = parser.parse_known_args()
    results = {seed: one_seed(seed, args.out, extra) for seed in args.seeds}
    rows = list(next(iter(results.values())))
    header = "| model | " + " | ".join(f"eval loss (seed {s}) | accuracy (seed {s})" for s in results) + " |"
    lines = [header, "|---|" + "---|---|" * len(results)]
    for row in rows:
        cells = [f"{results[s][row][0]:.3f} | {results[s][row][1]:.3f}" for s in results]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        from _sections import replace_marked_section

        seeds = " ".join(map(str, args.seeds))
        section = (f"{START}\n## Fine-tuning transfer: ft_transfer on the built-in arithmetic\n\n"
                   f"`OMP_NUM_THREADS=1 python scripts/bench_ft_transfer.py --seeds {seeds} --write` (tiny Llama, "
                   f"CPU). Eval loss: next-token loss on the assistant tokens of the held-out right answers; accuracy: "
                   f"greedy exact-match answers to 64 held-out questions.\n\n{table}\n{END}\n")
        replace_marked_section(REPO / "docs" / "benchmarks.md", START, END, section)


if __name__ == "__main__":
    main()
