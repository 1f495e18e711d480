#!/usr/bin/env python
"""Does the effitrain loop add anything on top of DeepSpeed?  Tokens/s of three loops on the same model and data:

* ``effitrain``: the real ``effitrain.train.train`` (events, guard, metrics, logging);
* ``deepspeed``: a minimal hand-written DeepSpeed loop (forward, backward, step; nothing else);
* ``hf_trainer``: the Hugging Face ``Trainer`` (plain torch, no DeepSpeed) on the same batches.

Each variant runs in its own fresh process, the variants alternate over ``--repeats`` rounds, and the median is
reported.  The first ``--warmup`` steps of every run are excluded from the timing.  Tool verbs are timed too.

    python scripts/bench_overhead.py                       # the default tiny_llama config, CPU
    python scripts/bench_overhead.py --write docs/benchmarks.md
    python scripts/bench_overhead.py model=llama_125m train.micro_batch_size=8 dataset.seq_len=512   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("effitrain", "deepspeed", "hf_trainer")
SECTION_START = "<!-- bench_overhead:start -->"
SECTION_END = "<!-- bench_overhead:end -->"


def _compose(overrides: list[str], steps: int, run_dir: Path):
    from effitrain.config.compose import compose_config

    return compose_config([*overrides, f"train.max_steps={steps}", "train.eval_every=0", "train.save_every=0",
                           "train.save_final_model=false", "logger.progress_bar=false", f"run_dir={run_dir}",
                           "overwrite=true"])


def _data_and_model(spec):
    """The same data pipeline and model the effitrain run builds (shared code, so all three see the same batches)."""
    from datasets import DatasetDict

    from effitrain.data.packing import to_numpy
    from effitrain.data.splits import build_packed_splits

    pool = spec.block("dataset").build(cache_dir=None)
    tokenizer, packed, _ = build_packed_splits(spec.block("dataset").params, spec.block("model").params,
                                               DatasetDict(train=pool["train"], eval=pool["eval"]))
    import torch
    torch.manual_seed(spec.train.seed)
    model = spec.block("model").build(tokenizer=tokenizer)
    return to_numpy(packed), model


def _batches(ids, micro: int, steps: int, seed: int):
    import numpy as np

    order = np.random.default_rng(seed).permutation(len(ids))
    for step in range(steps):
        rows = order[(step * micro) % (len(ids) - micro):][:micro]
        yield ids[rows]


def run_effitrain(overrides: list[str], steps: int, warmup: int) -> float:
    from effitrain.train import train

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        composed = _compose([*overrides, f"train.log_every={warmup}"], steps, run_dir)
        train(composed.cfg, run_dir=run_dir, recipes=composed.recipes)
        lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [l for l in lines if "tokens_per_s" in l][1:]  # the first window holds the warm-up steps
    tokens = sum(l["step_time_s"] * l["tokens_per_s"] for l in windows)
    seconds = sum(l["step_time_s"] for l in windows)
    return tokens / seconds


def run_deepspeed(overrides: list[str], steps: int, warmup: int) -> float:
    import torch

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed

    from effitrain.config.spec import validate
    from effitrain.parallel.dist import dist_env, init_process_group
    from effitrain.train import deepspeed_config

    with tempfile.TemporaryDirectory() as tmp:
        composed = _compose(overrides, steps, Path(tmp))
    spec = validate(composed.cfg, composed.recipes)
    dist_env()
    device_type = deepspeed.get_accelerator().device_name()
    init_process_group(device_type)
    precision = spec.block("precision").build(device_type=device_type,
                                              bf16_supported=deepspeed.get_accelerator().is_bf16_supported())
    ids, model = _data_and_model(spec)
    optimizer = spec.block("optimizer").build(model)
    scheduler = spec.block("scheduler").build(optimizer, max_steps=steps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(spec, precision.ds_config, 1))
    micro, seq = spec.train.micro_batch_size, ids.shape[1]
    start = None
    for step, rows in enumerate(_batches(ids, micro, steps, spec.train.seed)):
        if step == warmup:
            loss.item()  # noqa: F821 - drain the queue before the clock starts
            start = time.perf_counter()
        batch = torch.from_numpy(rows).to(engine.device, dtype=torch.long)
        loss = engine(input_ids=batch, labels=batch).loss
        engine.backward(loss)
        engine.step()
    loss.item()
    return (steps - warmup) * micro * seq / (time.perf_counter() - start)


def run_hf_trainer(overrides: list[str], steps: int, warmup: int) -> float:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from effitrain.config.spec import validate

    with tempfile.TemporaryDirectory() as tmp:
        composed = _compose(overrides, steps, Path(tmp))
        spec = validate(composed.cfg, composed.recipes)
        ids, model = _data_and_model(spec)
        micro, seq = spec.train.micro_batch_size, ids.shape[1]
        rows = list(_batches(ids, micro, steps, spec.train.seed))

        class Packed(torch.utils.data.Dataset):
            def __len__(self):
                return steps * micro

            def __getitem__(self, i):
                t = torch.from_numpy(rows[i // micro][i % micro]).long()
                return {"input_ids": t, "labels": t}

        marks: dict[str, float] = {}

        class Clock(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step == warmup:
                    if torch.cuda.is_available():
                        torch.cuda.synchronize()
                    marks["start"] = time.perf_counter()

            def on_train_end(self, args, state, control, **kwargs):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                marks["end"] = time.perf_counter()

        opt = spec.block("optimizer").params
        args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=micro, max_steps=steps,
                                 learning_rate=opt.lr, weight_decay=opt.weight_decay, adam_beta1=opt.beta1,
                                 adam_beta2=opt.beta2, max_grad_norm=spec.train.clip_grad_norm, report_to=[],
                                 save_strategy="no", logging_strategy="no", dataloader_num_workers=0,
                                 bf16=torch.cuda.is_available(), use_cpu=not torch.cuda.is_available(),
                                 disable_tqdm=True, seed=spec.train.seed)
        trainer = Trainer(model=model, args=args, train_dataset=Packed(), callbacks=[Clock()])
        trainer.train()
    return (steps - warmup) * micro * seq / (marks["end"] - marks["start"])


def _default_shape() -> str:
    from effitrain.config.compose import compose_config

    cfg = compose_config([]).cfg
    return (f"({cfg['model']['hidden_size']}-wide {cfg['model']['num_layers']}-layer Llama, seq_len "
            f"{cfg['dataset']['seq_len']}, micro batch {cfg['train']['micro_batch_size']})")


def time_verbs(repeats: int = 5) -> dict[str, float]:
    verbs = {"effitrain recipes": ["recipes"], "effitrain show wsd": ["show", "wsd"],
             "effitrain check +recipe=wsd": ["check", "+recipe=wsd"], "effitrain rules": ["rules"]}
    result = {}
    for label, args in verbs.items():
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "effitrain.cli", *args], check=True, capture_output=True,
                           cwd=REPO)
            times.append(time.perf_counter() - t)
        result[label] = statistics.median(times)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="config overrides, as for `effitrain`")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--write", type=Path, help="replace the overhead section of this markdown file")
    args = parser.parse_args()

    if args.variant:  # child process: one measurement, printed as JSON
        fn = {"effitrain": run_effitrain, "deepspeed": run_deepspeed, "hf_trainer": run_hf_trainer}[args.variant]
        print("RESULT " + json.dumps({"tokens_per_s": fn(args.overrides, args.steps, args.warmup)}), flush=True)
        return 0

    results: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for round_ in range(args.repeats):
        for variant in VARIANTS:
            out = subprocess.run([sys.executable, __file__, "--variant", variant, "--steps", str(args.steps),
                                  "--warmup", str(args.warmup), *args.overrides], capture_output=True, text=True,
                                 cwd=REPO)
            line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
            if out.returncode or not line:
                print(out.stdout[-3000:], out.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{variant} failed")
            results[variant].append(json.loads(line[0][7:])["tokens_per_s"])
            print(f"round {round_ + 1} {variant}: {results[variant][-1]:.0f} tokens/s", flush=True)
    verbs = time_verbs()

    import torch
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    median = {v: statistics.median(r) for v, r in results.items()}
    command = "python scripts/bench_overhead.py " + " ".join(
        [f"--steps {args.steps}", f"--warmup {args.warmup}", f"--repeats {args.repeats}", *args.overrides])
    lines = [SECTION_START, "## Engine overhead", "",
             f"Command: `{command.strip()}` — device: {device}, torch {torch.__version__}, "
             f"{platform.python_implementation()} {platform.python_version()}; date {time.strftime('%Y-%m-%d')}.",
             f"Config: the default `configs/train.yaml` {' '.join(args.overrides) or _default_shape()}, "
             f"fp32 on CPU / bf16 on GPU; {args.steps} steps, the first {args.warmup} untimed; median of "
             f"{args.repeats} alternating rounds, each in a fresh process.", "",
             "| loop | tokens/s (median) | runs | ratio to hand-written DeepSpeed |", "|---|---|---|---|"]
    for variant in VARIANTS:
        runs = ", ".join(f"{x:.0f}" for x in results[variant])
        lines.append(f"| {variant} | {median[variant]:.0f} | {runs} | {median[variant] / median['deepspeed']:.3f} |")
    lines += ["", "| tool verb | wall time (median of 5, fresh process) |", "|---|---|"]
    lines += [f"| `{label}` | {seconds:.2f} s |" for label, seconds in verbs.items()]
    lines.append(SECTION_END)
    table = "\n".join(lines)
    print(table)
    if args.write:
        from _sections import replace_marked_section

        replace_marked_section(args.write, SECTION_START, SECTION_END, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
