#!/usr/bin/env python
"""GRPO's step time with each sampling backend (``objective.grpo.generator``): ``transformers`` (the policy's own
``model.generate``) against ``vllm`` (a colocated engine given the policy's weights after every step), the same run
otherwise (model, prompts, group size, completion length, seed).

Each backend runs in a fresh process (the console script); the median ``step_time_s`` of the steps after
``--warmup`` is read from the run's ``metrics.jsonl``, and the speed-up is the ratio of the medians.  A backend the
machine cannot run (vllm without vllm installed or without a GPU) is not measured: its row shows effitrain's
refusal from ``effitrain check``.

    python scripts/bench_grpo_sampling.py                       # ~0.3B Llama, G=8, 256 new tokens, on a GPU
    python scripts/bench_grpo_sampling.py --tiny --steps 3 --warmup 1   # the plumbing on a tiny model, CPU

Extra ``key=value`` arguments go to every run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# a ~0.3B Llama (1024 wide, 16 layers) from scratch on the built-in arithmetic prompts: untrained, it rarely ends
# a completion early, so every sample is max_new_tokens long and the two backends generate the same token count
GPU_RUN = ["model=llama", "model.hidden_size=1024", "model.num_layers=16", "model.num_heads=16",
           "model.intermediate_size=2816", "objective.max_new_tokens=256", "train.micro_batch_size=8"]
TINY_RUN = ["model.vocab_size=512", "model.hidden_size=64", "model.intermediate_size=128", "model.num_layers=2",
            "objective.max_new_tokens=16", "train.micro_batch_size=2"]
COMMON = ["objective=grpo", "dataset=chat_demo", "dataset.format=prompts", "objective.group_size=8",
          "objective.beta=0.04", "objective.rewards=[{name:length,max_tokens:256,gated:false}]", "train.eval_every=0",
          "train.log_every=1", "logger.progress_bar=false", "scheduler.warmup_steps=1"]
BACKENDS = {"transformers": "{backend:transformers}", "vllm": "{backend:vllm}"}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "effitrain.cli", *args], capture_output=True, text=True)


def measure(backend: str, overrides: list[str], steps: int, warmup: int, out: Path) -> dict:
    args = [*overrides, f"+objective.generator={BACKENDS[backend]}", f"train.max_steps={steps}"]
    checked = cli("check", *args)
    if checked.returncode != 0:
        return {"backend": backend, "refused": checked.stderr.strip().splitlines()[-1]}
    run = out / backend
    done = cli(*args, f"run_dir={run}", "overwrite=true")
    if done.returncode != 0:
        return {"backend": backend, "failed": done.stderr.strip().splitlines()[-1]}
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    times = [m["step_time_s"] for m in lines if "step_time_s" in m and m.get("step", 0) > warmup]
    return {"backend": backend, "step_time_s": statistics.median(times), "steps_timed": len(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model: the plumbing, on a CPU")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args, extra = parser.parse_known_args()
    overrides = [*COMMON, *(TINY_RUN if args.tiny else GPU_RUN), *extra]
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_grpo_sampling-"))
    rows = [measure(b, overrides, args.steps, args.warmup, out) for b in BACKENDS]
    print("| backend | median step time (s) | steps timed |")
    print("|---|---|---|")
    for r in rows:
        if "step_time_s" in r:
            print(f"| {r['backend']} | {r['step_time_s']:.3f} | {r['steps_timed']} |")
        else:
            print(f"| {r['backend']} | not measured: {r.get('refused') or r.get('failed')} | 0 |")
    timed = {r["backend"]: r["step_time_s"] for r in rows if "step_time_s" in r}
    if len(timed) == 2:
        print(f"\nspeed-up of a GRPO step with vllm: {timed['transformers'] / timed['vllm']:.2f}x")


if __name__ == "__main__":
    main()
