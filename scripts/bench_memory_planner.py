"""How close is the memory planner (``effitrain check --memory``) to the bytes a real run holds?

For each configuration it trains a few steps on CPU through the real entry point (``effitrain.train.train``, under
``torchrun`` for the 2-process ZeRO-2 row) with one extra engine hook, ``memory_probe``, that measures the live
tensors with :mod:`effitrain.memory` at the points where each category is largest:

* gradients right after the backward pass of an accumulation boundary (``p.grad``, and for ZeRO-1/2 the optimizer's
  own gradient partition ``grads_in_partition`` / ``averaged_gradients``, which is where ZeRO-2 keeps them);
* parameters, optimizer state and fp32 master weights after the second optimizer step
  (``memory_report(engine.module, engine.optimizer)``, the same walk that writes ``summary.json``);
* activations: one extra forward pass of the first micro-batch under ``torch.autograd.graph.saved_tensors_hooks``,
  summing the unique storages autograd saves for backward, parameters excluded.

It compares them with the planner's estimate for the same config and world size, and writes a table into
``docs/benchmarks.md`` (the section between ``<!-- bench_memory_planner:start/end -->``).

    OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/bench_memory_planner.py
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from effitrain.engine.events import Hook  # noqa: E402  (torch-free)
from effitrain.registry import register  # noqa: E402

START, END = "<!-- bench_memory_planner:start -->", "<!-- bench_memory_planner:end -->"
COMMON = ["dataset.max_docs_per_domain=200", "dataset.eval_examples_per_domain=8", "train.max_steps=2",
          "train.eval_every=0", "train.eval_batches=1", "train.log_every=1", "scheduler.warmup_steps=1",
          "logger.progress_bar=false", "train.save_final_model=false", "precision=fp32", "model=tiny_llama",
          "+methods.memory_probe={}"]
#: label -> (overrides, processes)
CASES = {
    "AdamW": (["+recipe=baseline"], 1),
    "8-bit AdamW": (["+recipe=adamw_8bit"], 1),
    "GaLore": (["+recipe=galore"], 1),
    "LoRA": (["+recipe=lora", "model=tiny_llama"], 1),
    "AdamW, activation checkpointing": (["+recipe=baseline", "model.gradient_checkpointing=true"], 1),
    "AdamW, ZeRO-2, 2 processes": (["+recipe=baseline", "parallelism=zero2", "parallelism.reduce_bucket_size=500000",
                                    "train.micro_batch_size=4"], 2),
}


@register("method", "memory_probe", builder="__main__:build_probe",
          summary="bench_memory_planner: measure live tensor bytes per category during a run")
@dataclass
class ProbeParams:
    pass


class MemoryProbe(Hook):
    name = "memory_probe"

    def __init__(self) -> None:
        self.found: dict = {}

    def on_batch_start(self, state) -> None:
        if "activation_bytes" in self.found:
            return
        import torch

        params = {p.untyped_storage().data_ptr() for p in state.engine.module.parameters()}
        seen: dict = {}

        def pack(t):
            try:
                key = t.untyped_storage().data_ptr()
                if key not in params and key not in seen:
                    seen[key] = t.untyped_storage().nbytes()
            except RuntimeError:
                pass
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = state.engine.module(**state.batch)
        del out
        self.found["activation_bytes"] = sum(seen.values())
        self.found["activation_tokens"] = int(state.batch["input_ids"].numel())

    def on_after_backward(self, state) -> None:
        if state.step != 1 or not state.engine.is_gradient_accumulation_boundary():
            return
        from effitrain.memory import _sum_unique, _walk, optimizer_chain

        seen: set = set()
        grads = _sum_unique([p.grad for p in state.engine.module.parameters() if p.grad is not None], seen)
        bucket = 0
        for opt in optimizer_chain(state.engine.optimizer):
            for attr in ("grads_in_partition", "averaged_gradients"):
                grads += _sum_unique(_walk(getattr(opt, attr, None), set()), seen)
            for b in (getattr(opt, "ipg_buckets", None) or {}).values():
                bucket += _sum_unique(_walk(b.buffer, set()), seen)
        self.found.update(gradient_bytes=grads, reduction_bucket_bytes=bucket)

    def on_step_end(self, state) -> None:
        if state.step != 2:
            return
        from effitrain.memory import memory_report

        report = memory_report(state.engine.module, state.engine.optimizer)
        self.found.update({k: report[k] for k in ("parameter_bytes", "optimizer_state_bytes", "master_weight_bytes",
                                                  "trainable_params", "total_params")})
        (state.run_dir / f"memory_probe_rank{state.rank}.json").write_text(json.dumps(self.found))


def build_probe(params: ProbeParams) -> MemoryProbe:
    return MemoryProbe()


def worker(overrides: list[str], run_dir: Path) -> None:
    """One training run in this process (every rank under torchrun)."""
    from effitrain.config.compose import compose_config
    from effitrain.train import train

    composed = compose_config([*overrides, f"run_dir={run_dir}", "overwrite=true"])
    train(composed.cfg, run_dir=run_dir, argv=["bench_memory_planner", *overrides], recipes=composed.recipes)


def measure(overrides: list[str], procs: int, run_dir: Path) -> dict:
    launcher = [sys.executable] if procs == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}:{REPO / 'scripts'}"}
    proc = subprocess.run([*launcher, str(Path(__file__).resolve()), "--worker", str(run_dir), *overrides],
                          cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"run {overrides} failed:\n{proc.stderr[-3000:]}")
    return json.loads((run_dir / "memory_probe_rank0.json").read_text())


def estimate(overrides: list[str], procs: int):
    from effitrain.config.compose import compose_config
    from effitrain.config.spec import validate
    from effitrain.planner.memory import plan, setup_from_spec

    composed = compose_config([o for o in overrides if not o.startswith("+methods.memory_probe")])
    return plan(setup_from_spec(validate(composed.cfg, composed.recipes), world=procs))


def mib(n: float) -> str:
    return f"{n / 2 ** 20:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "bench_memory_planner")
    ap.add_argument("--doc", type=Path, default=REPO / "docs" / "benchmarks.md")
    a, rest = ap.parse_known_args()
    if a.worker:
        return worker(rest, a.worker)
    from _sections import replace_marked_section

    rows = ["| configuration | planned params+grads+state (MiB) | measured (MiB) | ratio | parameters plan / measured "
            "| gradients plan / measured | optimizer state + master plan / measured | activations plan / measured "
            "(MiB, fp32, one micro-batch) | ZeRO reduction bucket plan / measured |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    worst = 0.0
    for label, (case, procs) in CASES.items():
        overrides = [*COMMON, *case]
        got = measure(overrides, procs, a.out / label.replace(" ", "_").replace(",", ""))
        p = estimate(overrides, procs)
        planned = {k: p.get(k).device + p.get(k).host for k in ("parameter_bytes", "gradient_bytes",
                                                                 "optimizer_state_bytes", "master_weight_bytes",
                                                                 "activation_bytes")}
        plan_sum = sum(planned[k] for k in ("parameter_bytes", "gradient_bytes", "optimizer_state_bytes",
                                            "master_weight_bytes"))
        meas_sum = sum(got[k] for k in ("parameter_bytes", "gradient_bytes", "optimizer_state_bytes",
                                        "master_weight_bytes"))
        ratio = plan_sum / meas_sum
        worst = max(worst, abs(ratio - 1))
        state_plan = planned["optimizer_state_bytes"] + planned["master_weight_bytes"]
        state_meas = got["optimizer_state_bytes"] + got["master_weight_bytes"]
        rows.append(f"| {label} | {mib(plan_sum)} | {mib(meas_sum)} | {ratio:.3f} | "
                    f"{mib(planned['parameter_bytes'])} / {mib(got['parameter_bytes'])} | "
                    f"{mib(planned['gradient_bytes'])} / {mib(got['gradient_bytes'])} | "
                    f"{mib(state_plan)} / {mib(state_meas)} | "
                    f"{mib(planned['activation_bytes'])} / {mib(got['activation_bytes'])} | "
                    f"{mib(p.get('reduction_bucket_bytes').device)} / {mib(got['reduction_bucket_bytes'])} |")
        print(rows[-1], flush=True)
    cmd = "OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/bench_memory_planner.py " + \
        " ".join(shlex.quote(x) for x in sys.argv[1:])
    section = (f"{START}\n## Memory planner\n\n"
               f"`effitrain check --memory` (effitrain/planner/memory.py) against the live tensors of real runs on CPU: "
               f"the default tiny Llama (model=tiny_llama), fp32, 2 steps, rank 0 of each run. Gradients are measured "
               f"right after a backward pass (for ZeRO-2 in DeepSpeed's own gradient partition), parameters and "
               f"optimizer state (with DeepSpeed's fp32 master partition) after the second step, activations as the "
               f"unique storages autograd saves during one forward pass of a micro-batch (parameters excluded). "
               f"Largest deviation of params+grads+state: {100 * worst:.1f}% (target: within 10%). The activation "
               f"column compares what the forward pass saves; with activation checkpointing the plan adds one "
               f"layer's activations for the recomputation during backward, which a forward pass cannot show. "
               f"The ZeRO-2 row sets `parallelism.reduce_bucket_size=500000` (DeepSpeed sizes its reduction bucket "
               f"by it, not by the model); the bucket column is measured right after the backward pass.\n\n"
               f"Command: `{cmd.strip()}`\n\n" + "\n".join(rows) + f"\n{END}\n")
    replace_marked_section(a.doc, START, END, section)
    print(section)


if __name__ == "__main__":
    main()
