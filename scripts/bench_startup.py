#!/usr/bin/env python
"""How long until a run has trained?  Wall time of a 1-step effitrain run against a bare script that imports the same
stack, builds the same model and takes one DeepSpeed step — each in a fresh process, with warm caches (the demo
corpus, the trained BPE and DeepSpeed's compiled op already exist: a first warm-up round fills them).

* ``effitrain``: ``effitrain train.max_steps=1 …`` as a user types it (Hydra, validation, input checks, data from
  the cache, model, engine, one step, the evaluations at step 0 and at the end, the final checkpoint and model);
* ``effitrain_lean``: the same with the end-of-run work off (``train.eval_batches=1 train.save_final_model=false``)
  — what remains is start-up;
* ``bare``: ``import torch, deepspeed, transformers, datasets``; build the Llama of the config; ``deepspeed.initialize``;
  one forward/backward/step on a random batch.

The variants alternate over ``--repeats`` rounds; medians are reported.

    OMP_NUM_THREADS=1 python scripts/bench_startup.py --repeats 5 --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTION_START = "<!-- bench_startup:start -->"
SECTION_END = "<!-- bench_startup:end -->"

BARE = textwrap.dedent("""
    import os, sys, tempfile
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(k, v)
    import torch, deepspeed, transformers, datasets
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM
    store = dist.FileStore(os.path.join(tempfile.mkdtemp(), "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=4096, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=352, tie_word_embeddings=True))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, dist_init_required=False,
                                      config={"train_batch_size": 8, "train_micro_batch_size_per_gpu": 8,
                                              "gradient_clipping": 1.0, "steps_per_print": 10**9,
                                              "zero_allow_untested_optimizer": True})
    ids = torch.randint(0, 4096, (8, 128))
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    print(float(loss))
""")


def _cmd(variant: str, run_dir: Path) -> list[str]:
    if variant == "bare":
        return [sys.executable, "-c", BARE]
    common = [sys.executable, "-m", "effitrain.cli", "train.max_steps=1", "logger.progress_bar=false",
              f"run_dir={run_dir}"]
    if variant == "effitrain_lean":
        common += ["train.eval_batches=1", "train.save_final_model=false"]
    return common


def _time(variant: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = subprocess.run(_cmd(variant, Path(tmp) / "run"), cwd=REPO, capture_output=True, text=True)
        elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{result.stderr[-3000:]}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--write", type=Path, help="replace the start-up section of this markdown file")
    args = parser.parse_args()
    variants = ("effitrain", "effitrain_lean", "bare")
    for variant in variants:   # warm-up: fills the caches and DeepSpeed's op build; not timed
        _time(variant)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.repeats):
        for variant in variants:
            times[variant].append(_time(variant))
    med = {v: statistics.median(t) for v, t in times.items()}
    lines = [SECTION_START, "## Start-up: time to a trained step", "",
             f"Command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')} python scripts/bench_startup.py "
             f"--repeats {args.repeats}` — {platform.machine()}, {os.cpu_count()} CPU cores, Python "
             f"{platform.python_version()}; date {time.strftime('%Y-%m-%d')}. Each run is a fresh process with warm "
             f"caches; variants alternate; medians.", "",
             "| variant | wall s (median) | runs | ratio to bare |", "|---|---|---|---|"]
    for v in variants:
        runs = ", ".join(f"{t:.1f}" for t in times[v])
        lines.append(f"| {v} | {med[v]:.1f} | {runs} | {med[v] / med['bare']:.2f} |")
    lines.append(SECTION_END)
    table = "\n".join(lines) + "\n"
    print(table)
    if args.write:
        from _sections import replace_marked_section

        replace_marked_section(args.write, SECTION_START, SECTION_END, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
