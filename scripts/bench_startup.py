#!/usr/bin/env python
"""How long until a run has trained?  Wall time of a 1-step effitrain run against a bare script that imports the same
stack, builds the same model and takes one DeepSpeed step — each in a fresh process, with warm caches (the demo
corpus and the trained BPE exist: a first warm-up round fills them) and an empty torch extensions folder of its
own, which must still be empty at the end (a one-process run compiles no DeepSpeed op).

* ``effitrain``: the console script, ``effitrain train.max_steps=1 …`` as a user types it (validation, input
  checks, data from the cache, model, engine, one step, the evaluation at the end -- a run shorter than
  ``train.eval_every`` skips the one at step 0 --, the final checkpoint and model);
* ``effitrain_lean``: the same with the end-of-run work cut down (``train.eval_batches=1
  train.save_final_model=false``) — what remains is start-up;
* ``bare``: ``import torch, deepspeed, transformers, datasets``; build the Llama of the config; ``deepspeed.initialize``;
  one forward/backward/step on a random batch.

For the effitrain variants the table also gives the time from launch to the first line on stdout.
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
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
SECTION_START = "<!-- bench_startup:start -->"
SECTION_END = "<!-- bench_startup:end -->"
BARE_EXTENSIONS = Path(tempfile.gettempdir()) / "effitrain_bench_startup_bare_extensions"

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
    console_script = Path(sys.executable).parent / "effitrain"  # what `make install` puts on the venv's PATH
    launcher = [str(console_script)] if console_script.is_file() else [sys.executable, "-m", "effitrain.cli"]
    common = [*launcher, "train.max_steps=1", "logger.progress_bar=false", f"run_dir={run_dir}"]
    if variant == "effitrain_lean":
        common += ["train.eval_batches=1", "train.save_final_model=false"]
    return common


def _time(variant: str) -> tuple[float, Optional[float], int]:
    """Wall time of one fresh process; when its first line of output came (None: the bare script prints only at
    the end); how many files it wrote into its own, empty, torch extensions folder (a compiled op would be there)."""
    with tempfile.TemporaryDirectory() as tmp:
        # the bare script does compile DeepSpeed's shared-memory op (deepspeed.init_distributed): it gets a folder
        # that the warm-up round filled, so its times are those of a warm machine, not of a gcc run
        extensions = BARE_EXTENSIONS if variant == "bare" else Path(tmp) / "torch_extensions"
        extensions.mkdir(exist_ok=True)
        files_before = sum(1 for p in extensions.rglob("*") if p.is_file())
        env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions)}
        start = time.perf_counter()
        proc = subprocess.Popen(_cmd(variant, Path(tmp) / "run"), cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)
        first_line = None
        assert proc.stdout is not None
        for line in proc.stdout:  # read as it comes, so the first line's time is when the user would see it
            if first_line is None and line.strip() and variant != "bare":
                first_line = time.perf_counter() - start
        stderr = proc.stderr.read() if proc.stderr else ""
        code = proc.wait()
        elapsed = time.perf_counter() - start
        built = sum(1 for p in extensions.rglob("*") if p.is_file()) - files_before
    if code != 0:
        raise SystemExit(f"{variant} failed:\n{stderr[-3000:]}")
    return elapsed, first_line, built


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--write", type=Path, help="replace the start-up section of this markdown file")
    args = parser.parse_args()
    variants = ("effitrain", "effitrain_lean", "bare")
    for variant in variants:   # warm-up: fills the data and tokenizer caches; not timed
        _time(variant)
    load_before = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    times: dict[str, list[float]] = {v: [] for v in variants}
    first_lines: dict[str, list[float]] = {v: [] for v in variants}
    built: dict[str, int] = {v: 0 for v in variants}
    for _ in range(args.repeats):
        for variant in variants:
            elapsed, first_line, files = _time(variant)
            times[variant].append(elapsed)
            if first_line is not None:
                first_lines[variant].append(first_line)
            built[variant] += files
    med = {v: statistics.median(t) for v, t in times.items()}
    lines = [SECTION_START, "## Start-up: time to a trained step", "",
             f"Command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')} python scripts/bench_startup.py "
             f"--repeats {args.repeats}` — {platform.machine()}, {os.cpu_count()} CPU cores, Python "
             f"{platform.python_version()}; date {time.strftime('%Y-%m-%d')}; load average before the first round "
             f"{load_before}. Each run is a fresh process with warm caches and an empty torch extensions folder of "
             f"its own (`TORCH_EXTENSIONS_DIR`; the bare script's is warm: it compiles DeepSpeed's op once, in the warm-up); variants alternate; medians. First line: seconds from launch to "
             f"the first line on stdout.", "",
             "| variant | wall s (median) | runs | ratio to bare | first line s (median) | files compiled into "
             "the extensions folder (timed runs) |", "|---|---|---|---|---|---|"]
    for v in variants:
        runs = ", ".join(f"{t:.1f}" for t in times[v])
        first = f"{statistics.median(first_lines[v]):.2f}" if first_lines[v] else "—"
        lines.append(f"| {v} | {med[v]:.1f} | {runs} | {med[v] / med['bare']:.2f} | {first} | {built[v]} |")
    lines.append(SECTION_END)
    table = "\n".join(lines) + "\n"
    print(table)
    if args.write:
        from _sections import replace_marked_section

        replace_marked_section(args.write, SECTION_START, SECTION_END, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
