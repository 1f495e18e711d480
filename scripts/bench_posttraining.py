#!/usr/bin/env python
"""Post-training recipes on the built-in checkable arithmetic (tiny Llama, CPU): held-out exact-answer accuracy and
eval loss (next-token loss on the assistant tokens of the right answers) before and after each stage, with the
stage's training throughput and peak memory.

* ``sft``: the ``sft`` recipe (the tiny model from scratch, trained on the conversations);
* ``dpo``: the ``dpo`` recipe (the same SFT stage, then DPO on right-vs-wrong pairs against the frozen SFT model);
* ``sft_then_grpo``: SFT on ``<think>..</think> \\boxed{N}`` answers, then GRPO with accuracy + format rewards;
* ``format_length_grpo``: a short SFT, then GRPO on the format reward, then on format + length (no answers read);
* ``tulu3``: SFT, DPO, then GRPO with the verifiable reward (10 when right);
* ``dump``: SFT, then GRPO over six arithmetic distributions drawn by DUMP's UCB sampler (``curriculum: dump``); its
  uniform baseline is the same command with ``'~stages.1.curriculum'`` (the stage's rows then shuffled);
* ``relift``: a short SFT, then GRPO with SFT steps interleaved on the questions whose samples all fail
  (``objective: mixed``, controller relift);
* ``sasr``: one stage, SFT warm-up then each step SFT or GRPO drawn from the SFT gradient norm (controller sasr);
* ``sami``: SFT on answers in a random style (number only or a sentence), then SAMI with two constitutions; its
  stage's ``sami_follow`` (the share of sampled responses that follow their own constitution) is printed as the
  mean of the first and of the last five log lines;
* ``mix_cpt``: SFT on the arithmetic (knowledge), then format alignment to ``<think>..</think> \\boxed{N}`` with
  logit-swap self-distillation; its SFT baseline is the same command with ``'stages.1.objective={name:sft}'``.
* ``thinkless``: SFT on paired ``<think>``/``<short>`` answers, then decoupled GRPO with the mode-aware reward; the
  share of held-out answers that begin with ``<short>`` (``eval_share_short``) and the accuracy of each mode are
  printed in a second table; plain GRPO's is the same command with ``'~stages.1.objective.decoupled_alpha'``.
* ``score``: SFT, then SCoRe's two multi-turn stages (answer, a scripted "there might be an error" message, answer
  again); its stages also print a second table: held-out accuracy at turn 1 and turn 2 and the shares of questions
  turned wrong -> right and right -> wrong (``eval_accuracy_t2``, ``eval_wrong_to_right``, ``eval_right_to_wrong``).

Every number is read from the runs' own ``metrics.jsonl`` / ``summary.json`` (``eval_accuracy`` from the
``answer_accuracy`` method: greedy answers to the held-out questions; ``eval_reward``: the RL stage's own rewards
on those answers).  ``--first-stage-steps N`` sets the SFT stage's length (``train.max_steps`` of ``sft``,
``stages.0.train.max_steps`` of the others), so the RL stages start from a model that answers some questions right.
Tokens/s: the training loop's figure (packed rows) for sft and dpo stages; for a grpo stage the completion tokens
sampled per second (the loop's counter there counts prompt rows, not the samples), marked "sampled".

    OMP_NUM_THREADS=1 python scripts/bench_posttraining.py            # sft and dpo, seed 0
    OMP_NUM_THREADS=1 python scripts/bench_posttraining.py --only sft_then_grpo format_length_grpo \\
        --first-stage-steps 600

Extra ``key=value`` arguments go to every run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
RECIPES = ["sft", "dpo", "sft_then_grpo", "format_length_grpo", "tulu3", "dump", "relift", "sasr", "sami",
           "mix_cpt", "thinkless", "score"]


def _lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def sampled_tokens_per_s(run: Path, train: list[dict]) -> Optional[float]:
    """For a grpo stage, the completion tokens sampled per second (completion length x group size x prompts per
    step / time per step, median over the log lines); None for other objectives."""
    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    if cfg["objective"]["name"] != "grpo":
        return None
    prompts = cfg["train"]["micro_batch_size"] * cfg["train"]["grad_accum"]
    return statistics.median(m["completion_tokens"] * cfg["objective"]["group_size"] * prompts / m["step_time_s"]
                             for m in train)


def stage_figures(run: Path) -> dict:
    evals = [m for m in _lines(run) if "eval_accuracy" in m]
    summary = json.loads((run / "summary.json").read_text())
    train = [m for m in _lines(run) if "tokens_per_s" in m]
    sampled = sampled_tokens_per_s(run, train)
    rewards = [m for m in evals if "eval_reward" in m]
    return {"acc_before": evals[0]["eval_accuracy"], "acc_after": evals[-1]["eval_accuracy"],
            "loss_before": evals[0]["eval_loss"], "loss_after": evals[-1]["eval_loss"],
            "reward_before": rewards[0]["eval_reward"] if rewards else None,
            "reward_after": rewards[-1]["eval_reward"] if rewards else None,
            "len_before": evals[0]["eval_response_tokens"], "len_after": evals[-1]["eval_response_tokens"],
            "step_time_s": statistics.median(m["step_time_s"] for m in train),
            "tokens_per_s": statistics.median(m["tokens_per_s"] for m in train) if sampled is None else sampled,
            "sampled": sampled is not None,
            "peak_memory_mib": max(m.get("peak_memory_bytes", 0) for m in train) / 2**20,
            "steps": summary.get("steps"), **follow_share(train), "turns": turn_figures(evals),
            # control-token recipes (thinkless): which mode the greedy held-out answers chose, and how well
            "modes": {key: (evals[0][key], evals[-1][key]) for key in evals[-1]
                      if key.startswith(("eval_share_", "eval_accuracy_")) and key in evals[0]}
            if any(key.startswith("eval_share_") for key in evals[-1]) else {}}


def follow_share(train: list[dict]) -> dict:
    """A sami stage's share of responses that follow their own constitution: the mean of its first and of its
    last five log lines (empty for other objectives)."""
    follow = [m["sami_follow"] for m in train if "sami_follow" in m]
    if not follow:
        return {}
    return {"follow_before": statistics.mean(follow[:5]), "follow_after": statistics.mean(follow[-5:])}


def turn_figures(evals: list[dict]) -> Optional[dict]:
    """A multi-turn stage's held-out figures at its first and last evaluation (None for one turn): accuracy at
    turn 1 and turn 2, and the shares turned wrong -> right and right -> wrong."""
    if "eval_accuracy_t2" not in evals[-1]:
        return None
    keys = ("eval_accuracy", "eval_accuracy_t2", "eval_wrong_to_right", "eval_right_to_wrong")
    return {"before": {k: evals[0][k] for k in keys}, "after": {k: evals[-1][k] for k in keys}}


def run_recipe(recipe: str, seed: int, out: Path, extra: list[str], reuse: bool = False) -> dict[str, dict]:
    run = out / f"{recipe}-seed{seed}"
    cmd = [sys.executable, "-m", "effitrain.cli", f"+recipe={recipe}", f"train.seed={seed}", f"run_dir={run}",
           "overwrite=true", "logger.progress_bar=false", *extra]
    if not (reuse and (run / "summary.json").is_file()):
        subprocess.run(cmd, cwd=REPO, check=True)
    stages = run / "stages"
    if stages.is_dir():
        return {d.name.split("-", 1)[1]: stage_figures(d) for d in sorted(stages.iterdir()) if d.is_dir()}
    return {recipe: stage_figures(run)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=RECIPES, nargs="*", default=["sft", "dpo"])
    parser.add_argument("--first-stage-steps", type=int, default=None)
    parser.add_argument("--reuse", action="store_true", help="read finished runs under --out instead of running")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench_posttraining")
    args, extra = parser.parse_known_args()
    rows = []
    for recipe in args.only:
        for seed in args.seeds:
            length = []
            if args.first_stage_steps is not None and recipe != "sasr":   # sasr is one stage: its warm-up is inside
                key = "train.max_steps" if recipe == "sft" else "stages.0.train.max_steps"
                length = [f"{key}={args.first_stage_steps}"]
            for stage, f in run_recipe(recipe, seed, args.out, [*length, *extra], args.reuse).items():
                rows.append((recipe, seed, stage, f))
    print("| recipe | seed | stage | steps | accuracy before -> after | eval reward before -> after | answer tokens "
          "before -> after | eval loss before -> after | s/step | tokens/s | peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for recipe, seed, stage, f in rows:
        reward = "-" if f["reward_before"] is None else f"{f['reward_before']:.3f} -> {f['reward_after']:.3f}"
        print(f"| {recipe} | {seed} | {stage} | {f['steps']} | {f['acc_before']:.3f} -> {f['acc_after']:.3f} | "
              f"{reward} | {f['len_before']:.1f} -> {f['len_after']:.1f} | "
              f"{f['loss_before']:.3f} -> {f['loss_after']:.3f} | {f['step_time_s']:.3f} | "
              f"{f['tokens_per_s']:.0f}{' sampled' if f['sampled'] else ''} | {f['peak_memory_mib']:.0f} |"
              + (f" follow {f['follow_before']:.3f} -> {f['follow_after']:.3f}" if "follow_before" in f else ""))
    moded = [(recipe, seed, stage, f) for recipe, seed, stage, f in rows if f["modes"]]
    if moded:
        keys = sorted({k for *_, f in moded for k in f["modes"]})
        print()
        print("| recipe | seed | stage | " + " | ".join(f"{k.removeprefix('eval_')} before -> after" for k in keys)
              + " |")
        print("|---|---|---|" + "---|" * len(keys))
        for recipe, seed, stage, f in moded:
            cells = [f"{f['modes'][k][0]:.3f} -> {f['modes'][k][1]:.3f}" if k in f["modes"] else "-" for k in keys]
            print(f"| {recipe} | {seed} | {stage} | " + " | ".join(cells) + " |")
    turns = [(recipe, seed, stage, f["turns"]) for recipe, seed, stage, f in rows if f["turns"]]
    if turns:
        print("\n| recipe | seed | stage | accuracy turn 1 before -> after | accuracy turn 2 before -> after | "
              "wrong -> right before -> after | right -> wrong before -> after |")
        print("|---|---|---|---|---|---|---|")
        for recipe, seed, stage, t in turns:
            cells = " | ".join(f"{t['before'][k]:.3f} -> {t['after'][k]:.3f}" for k in (
                "eval_accuracy", "eval_accuracy_t2", "eval_wrong_to_right", "eval_right_to_wrong"))
            print(f"| {recipe} | {seed} | {stage} | {cells} |")


if __name__ == "__main__":
    main()
