#!/usr/bin/env python
"""How fast do the tool verbs answer?  Wall time of each verb as a user types it (a fresh ``python -m effitrain.cli``
process per call, so interpreter start, imports and Hydra's composition are all counted), over ``--repeats`` rounds
in which the verbs alternate; medians reported.  Also checks, in each verb's own process, that neither torch nor
deepspeed was imported.

    python scripts/bench_verbs.py --repeats 5 --write docs/benchmarks.md

``check +recipe=NAME`` is timed the same way for each recipe of ``--check-recipes`` (default: the third wave of
methods, issue #26, whose "done when" asks for ``check`` in under a second), in the same alternating rounds.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from _sections import replace_marked_section  # noqa: E402

SECTION_START = "<!-- bench_verbs:start -->"
SECTION_END = "<!-- bench_verbs:end -->"

VERBS = {
    "recipes": ["recipes"],
    "show": ["show", "wsd"],
    "diff": ["diff", "baseline", "wsd"],
    "explain": ["explain", "optimizer.lr", "+recipe=galore", "optimizer.lr=1e-3"],
    "plan": ["plan", "+recipe=wsd"],
    "lock --check (one recipe)": ["lock", "--check", "wsd"],
    "lock --check (all recipes)": ["lock", "--check"],
}
#: issue #26's recipes (methods, third wave): each must pass ``effitrain check`` in under a second
THIRD_WAVE = ["ingenious", "got_d", "rds_plus", "codeact", "untie_knots", "cmr_law", "merge_ablation", "anneal_law",
              "muon", "cosmos", "low_rank_refresh", "tri_adapt_lora", "loram"]
PROBE = ("import runpy, sys; sys.argv = ['effitrain', *{args!r}]; "
         "code = 0\ntry:\n    runpy.run_module('effitrain.cli', run_name='__main__')\nexcept SystemExit as e:\n"
         "    code = e.code or 0\n"
         "heavy = [m for m in ('torch', 'deepspeed') if m in sys.modules]\n"
         "sys.stderr.write(f'HEAVY {{heavy}} CODE {{code}}\\n')")


def run_once(args: list[str]) -> tuple[float, list[str], int]:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", PROBE.format(args=args)], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    seconds = time.perf_counter() - start
    line = [l for l in out.stderr.splitlines() if l.startswith("HEAVY ")][-1]
    heavy = eval(line.split(" CODE ")[0][len("HEAVY "):])  # a list literal this script printed itself
    return seconds, heavy, int(line.split(" CODE ")[1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--write", type=Path, help="replace the tool-verbs section of this markdown file")
    ap.add_argument("--check-recipes", nargs="*", default=THIRD_WAVE,
                    help="recipes whose `effitrain check +recipe=NAME` is timed too (none: skip)")
    args = ap.parse_args()
    verbs = {**VERBS, **{f"check {r}": ["check", f"+recipe={r}"] for r in args.check_recipes}}
    times: dict[str, list[float]] = {name: [] for name in verbs}
    heavy: dict[str, list[str]] = {}
    codes: dict[str, int] = {}
    run_once(VERBS["recipes"])  # warm the file system cache once
    for _ in range(args.repeats):
        for name, verb in verbs.items():   # alternating rounds: drift on a shared machine hits every verb alike
            seconds, imported, code = run_once(verb)
            times[name].append(seconds)
            heavy[name], codes[name] = imported, code
    rows = ["| verb | command | median wall time (s) | min–max (s) | torch/deepspeed imported |",
            "|---|---|---|---|---|"]
    for name, verb in verbs.items():
        t = times[name]
        rows.append(f"| {name} | `effitrain {' '.join(verb)}` | {statistics.median(t):.2f} | {min(t):.2f}–{max(t):.2f} "
                    f"| {'yes: ' + ', '.join(heavy[name]) if heavy[name] else 'no'} |")
    section = "\n".join([
        SECTION_START, "## Tool verbs", "",
        f"Each call a fresh process (interpreter start, imports and Hydra's composition counted), {args.repeats} "
        f"alternating rounds, medians; {platform.processor() or platform.machine()}, {os.cpu_count()} cores.", "",
        "```", f"python scripts/bench_verbs.py --repeats {args.repeats} --write docs/benchmarks.md"
        + ("" if args.check_recipes == THIRD_WAVE else f" --check-recipes {' '.join(args.check_recipes)}"), "```", "",
        *rows, "", SECTION_END])
    print(section)
    if args.write:
        replace_marked_section(args.write, SECTION_START, SECTION_END, section)
    bad = [n for n in verbs if heavy[n] or codes[n] != 0]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
