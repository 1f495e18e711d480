#!/usr/bin/env python
"""Domain upsampling at the end of training against the same run without the switch: per-domain eval loss.

Both arms train the default ``tiny_llama`` on the demo corpus through the real ``effitrain`` CLI, with the
``domain_upsampling`` recipe (``curriculum=mixture``, the same sampler and seed); the control sets the recipe's
second mixture to the first one, so the arms differ only in the weights of the last 20% of steps.  Per-domain eval
losses are mean token losses on the untouched eval split at the end.  The script also times the mixture sampler
against the shuffle sampler (host time to hand out the batches of ``--steps`` steps; median ratio of alternating
rounds), because a curriculum must add nothing measurable to a step.

    python scripts/bench_domain_upsampling.py                              # 200 steps, seed 0
    python scripts/bench_domain_upsampling.py --steps 400 --seeds 0 1
    python scripts/bench_domain_upsampling.py --write docs/benchmarks.md   # replace the "Domain upsampling" section

Extra ``key=value`` arguments are passed to every run.  On a shared CPU machine use ``OMP_NUM_THREADS=1``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from _sections import replace_marked_section, with_reading  # noqa: E402

SECTION_START = "<!-- bench_domain_upsampling:start -->"
SECTION_END = "<!-- bench_domain_upsampling:end -->"
BASE = "{prose: 0.4, docstrings: 0.3, code: 0.2, arithmetic: 0.1}"  # the recipe's first mixture


def run(overrides: list[str], run_dir: Path, log: Path) -> dict:
    cmd = [sys.executable, "-m", "effitrain.cli", *overrides, f"run_dir={run_dir}", "overwrite=true"]
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env=os.environ.copy())
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({proc.returncode}): {' '.join(cmd)}\n" + "\n".join(log.read_text()
                                                                                         .splitlines()[-15:]))
    return json.loads((run_dir / "summary.json").read_text())


def sampler_cost_ratio(steps: int, rounds: int = 7) -> tuple[float, float]:
    """Median over alternating rounds of (mixture sampler time / shuffle sampler time) for ``steps`` steps, and
    the mixture sampler's seconds per step in the last round."""
    import numpy as np

    from effitrain.curriculum.mixture import MixtureSampler
    from effitrain.curriculum.samplers import ShuffleSampler
    from effitrain.timeline import parse_timeline

    labels = np.repeat(np.array(["arithmetic", "code", "docstrings", "prose"]), 5000)
    tl = parse_timeline({"mixture": {"unit": "fraction", "points": [
        {"at": 0, "value": {"prose": 0.4, "docstrings": 0.3, "code": 0.2, "arithmetic": 0.1}},
        {"at": 0.8, "value": {"prose": 0.2, "docstrings": 0.15, "code": 0.4, "arithmetic": 0.25}}]}}
    ).resolve(max_steps=steps, tokens_per_step=1024)
    layout = dict(seed=0, micro_batch_size=8, grad_accum=1, world_size=1, rank=0)

    def timed(make) -> float:
        it = iter(make())
        t = time.perf_counter()
        for _ in range(steps):
            next(it)
        return time.perf_counter() - t

    ratios = []
    for _ in range(rounds):
        shuffle = timed(lambda: ShuffleSampler(len(labels), **layout))
        mixture = timed(lambda: MixtureSampler(labels, tl, **layout))
        ratios.append(mixture / shuffle)
    return statistics.median(ratios), mixture / steps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "bench_domain_upsampling")
    ap.add_argument("--write", type=Path, default=None, help="markdown file whose section to replace")
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    arms = {"base mix throughout": [f"timeline.mixture.points.1.value={BASE}"], "domain_upsampling": []}
    results: dict[str, list[dict]] = {a: [] for a in arms}
    for seed in args.seeds:
        for arm, extra in arms.items():
            common = ["+recipe=domain_upsampling", f"train.max_steps={args.steps}", "train.eval_every=0",
                      "train.save_every=0", f"train.seed={seed}", "logger.progress_bar=false", *args.overrides]
            tag = f"{'control' if extra else 'upsampled'}-seed{seed}"
            print(f"{arm}, seed {seed}: training", flush=True)
            s = run([*common, *extra], args.out / tag, args.out / f"{tag}.log")
            results[arm].append({**(s.get("eval_losses") or {}), "all": s.get("final_eval_loss")})
    (args.out / "results.json").write_text(json.dumps(results, indent=1))

    domains = sorted(k for k in results["domain_upsampling"][0] if k != "all") + ["all"]
    lines = ["| arm | " + " | ".join(f"{d} eval loss" for d in domains) + " |", "|---|" + "---|" * len(domains)]
    for arm, runs in results.items():
        lines.append(f"| {arm} | " + " | ".join(f"{statistics.mean(r[d] for r in runs):.3f}" for d in domains)
                     + " |")
    table = "\n".join(lines)
    ratio, per_step = sampler_cost_ratio(args.steps * 10)
    print(table)
    print(f"mixture / shuffle sampler host time: {ratio:.2f}x ({per_step * 1e6:.0f} us per step)")
    if args.write:
        env = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if os.environ.get("OMP_NUM_THREADS") else ""
        cmd = env + "python scripts/bench_domain_upsampling.py " + " ".join(
            [f"--steps {args.steps}", "--seeds " + " ".join(map(str, args.seeds)), *args.overrides,
             f"--write {args.write}"])
        body = (f"## Domain upsampling\n\n{SECTION_START}\n"
                f"`domain_upsampling` (the last 20% of steps draw code 0.4 and arithmetic 0.25 instead of 0.2 and "
                f"0.1) against the same recipe with the base mixture throughout; default `tiny_llama`, "
                f"{args.steps} steps, seeds {', '.join(map(str, args.seeds))} (means); mean token loss on the "
                f"eval split at the end. Machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
                f"{platform.python_version()}.\n\n```\n{cmd}\n```\n\n{table}\n\n"
                f"Mixture sampler host time per step against the shuffle sampler's (median of 7 alternating rounds "
                f"of {args.steps * 10} steps, 20,000 rows, 8 rows per step): {ratio:.2f}x, "
                f"{per_step * 1e6:.0f} µs per step.\n")
        body = with_reading(body, __file__)
        body += f"{SECTION_END}\n"
        replace_marked_section(args.write, f"## Domain upsampling\n\n{SECTION_START}", SECTION_END, body)
        print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
