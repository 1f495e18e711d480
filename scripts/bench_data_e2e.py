#!/usr/bin/env python
"""A recipe end to end on a synthetic corpus through the sharded data engine: the console script, an empty cache,
``data.executor=local``, then a few training steps -- each data stage's wall time and the peak RSS of the driving
process and of the largest task process of each stage.

    python scripts/bench_data_e2e.py --docs 10000 1000000 --recipe dsir --tasks 2 --workdir /tmp/bench-e2e

The corpora come from scripts/make_corpus.py (16 JSON-lines files, 5 domains; written once into ``--workdir``).
Memory is sampled every ``--every`` seconds with psutil over the process tree of the run (a stage's task processes
are the driver's children while that stage runs; a short stage may be missed between two samples, and then shows
no task figure); the driver's peak is also given by phase (a stage's name while its tasks run, ``after STAGE`` for
the reduce that follows it, up to the next stage).  The issue's target (#24): the peak RSS per process at 1M
documents within 1.5x of its value at 10k.  The machine is shared: the load before each run is printed with it.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
EFFITRAIN = str(Path(sys.executable).parent / "effitrain")
# the lines worth keeping beside the table: the data engine's reduces, a curriculum's scoring, the run's last line
SAID = ("data: ", "LQS: ", "delt: ", "finished: ")
STAGE = re.compile(r"^data: ([\w-]+): (\d+ of \d+ tasks to run|done in ([\d.]+) s)")


def _run(recipe: str, corpus: Path, tasks: int, steps: int, work: Path, every: float, extra: list[str],
         log: Path | None = None) -> dict:
    env = {**os.environ, "EFFITRAIN_CACHE": str(work / "cache"), "OMP_NUM_THREADS": "1"}
    cmd = [EFFITRAIN, f"+recipe={recipe}", "dataset=local", f"dataset.path={corpus}", "dataset.domain_field=domain",
           "data.executor=local", f"data.tasks={tasks}", f"data.workers={tasks}", f"train.max_steps={steps}",
           f"run_dir={work / 'run'}", *extra]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    driver = psutil.Process(proc.pid)
    state = {"stage": "start-up", "driver": 0, "driver_by": {}, "tasks": {}, "times": {}, "lines": []}

    def sample() -> None:
        while proc.poll() is None:
            try:
                rss = driver.memory_info().rss
                state["driver"] = max(state["driver"], rss)
                by = state["driver_by"]  # a stage's tasks run, then its reduce in the driver ("after STAGE")
                by[state["stage"]] = max(by.get(state["stage"], 0), rss)
                tasks_rss = []
                for child in driver.children(recursive=True):
                    tasks_rss.append(child.memory_info().rss)
                    stage = state["stage"]
                    state["tasks"][stage] = max(state["tasks"].get(stage, 0), tasks_rss[-1])
                if log is not None:  # every sample as it is taken: a run stopped before its end still has its peaks
                    with open(log, "a") as fh:
                        fh.write(f"{time.strftime('%H:%M:%S')} {recipe} {corpus.name} {state['stage']} driver "
                                 f"{rss >> 20} MB tasks {sorted((t >> 20 for t in tasks_rss), reverse=True)} MB\n")
            except psutil.Error:
                pass
            time.sleep(every)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    for line in proc.stdout:
        state["lines"].append(line.rstrip())
        m = STAGE.match(line)
        if m and m.group(3) is None:
            state["stage"] = m.group(1)
        elif m:
            state["times"][m.group(1)] = float(m.group(3))
            state["stage"] = f"after {m.group(1)}"
    rc = proc.wait()
    watcher.join()
    if rc != 0:
        print("\n".join(state["lines"][-20:]), file=sys.stderr)
        raise SystemExit(f"{recipe} on {corpus} exited {rc}")
    return {"wall": time.perf_counter() - start, **state}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, nargs="+", default=[10_000])
    parser.add_argument("--recipe", default="dsir")
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--every", type=float, default=2.0, help="seconds between two memory samples")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--log", type=Path, default=None, help="append every memory sample to this file as it is taken")
    parser.add_argument("extra", nargs="*", help="more overrides, e.g. selection.target.domain=science")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO / "scripts"))
    import make_corpus

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-data-e2e-"))
    extra = args.extra or (["selection.target.domain=science"] if args.recipe == "dsir" else [])
    print(f"| documents | load before | wall | stage: seconds / peak task RSS | peak RSS (driver) | driver by phase |")
    print("|---|---|---|---|---|---|")
    notes = []
    for docs in args.docs:
        corpus = workdir / f"corpus-{docs}"
        if not corpus.exists():
            make_corpus.generate(corpus, docs=docs, files=16, fmt="jsonl", seed=0, ids=True)
        load = " ".join(f"{x:.1f}" for x in os.getloadavg())
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            r = _run(args.recipe, corpus, args.tasks, args.steps, Path(tmp), args.every, extra, args.log)
        stages = "; ".join(f"{s} {t:.1f} s / {r['tasks'].get(s, 0) / 2**20:,.0f} MB" for s, t in r["times"].items())
        phases = "; ".join(f"{s} {v / 2**20:,.0f} MB" for s, v in r["driver_by"].items())
        print(f"| {docs:,} | {load} | {r['wall']:.0f} s | {stages} | {r['driver'] / 2**20:,.0f} MB | {phases} |",
              flush=True)
        notes.append((docs, [line for line in r["lines"] if line.startswith(SAID) and not STAGE.match(line)]))
    for docs, lines in notes:  # what the reduces said (a selection's counts, the chains' index) and the run's end
        print(f"\n{docs:,} documents:\n" + "\n".join(f"    {line}" for line in lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
