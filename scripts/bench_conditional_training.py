#!/usr/bin/env python
"""Conditional training (recipe conditional_training) on the demo corpus, tiny Llama, CPU: does conditioning on
<|good|> make the model write text its scorer rates better than conditioning on <|bad|> or on nothing?

Trains the ``conditional_training`` recipe (sentences rated by the perplexity scorer's pool proxy; the 5% with the
lowest loss <|good|>), then samples continuations of ``EOS + <|good|>``, ``EOS + <|bad|>`` and ``EOS`` alone as the
authors' evaluation does (temperature 0.7, top-p 0.9, control tokens banned) and rates each sample with the same
proxy, sentence by sentence as the training sentences were (its mean token loss on the sentence's bytes, lower =
better).  Reported: the sentences' mean score and the share at or under the run's threshold (the rule that made
<|good|>: 5% of the training sentences).

    OMP_NUM_THREADS=1 python scripts/bench_conditional_training.py [--seeds 0 1] [--samples 64] [--write] [k=v ...]

Extra ``key=value`` arguments go to the training run.  ``--write`` replaces the marked section of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
START, END = "<!-- bench_conditional_training:start -->", "<!-- bench_conditional_training:end -->"
ARITHMETIC = re.compile(r"\d+\s*[-+*/x]\s*\d+\s*=")  # "12 + 7 =": the demo corpus's arithmetic worksheets
THRESHOLD = re.compile(r"control tokens: .* threshold (\S+) \(<= is good\)")


def train(seed: int, out: Path, extra: list[str]) -> tuple[Path, float]:
    run = out / f"conditional_training-seed{seed}"
    result = subprocess.run([sys.executable, "-m", "effitrain.cli", "+recipe=conditional_training",
                             f"train.seed={seed}", f"run_dir={run}", "overwrite=true", "logger.progress_bar=false",
                             *extra], cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(result.stdout[-3000:] + result.stderr[-3000:])
    found = THRESHOLD.search(result.stdout + result.stderr)
    return run, float(found.group(1))


def sample_scores(run: Path, proxy: Path, seed: int, n: int) -> dict[str, list[float]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from effitrain.data.conditional import split_segments
    from effitrain.selection.refmodel import ByteEncoder, example_losses

    rater = AutoModelForCausalLM.from_pretrained(str(proxy)).eval()  # the byte-level proxy that rated the sentences
    encode = ByteEncoder(int(json.loads((proxy / "proxy.json").read_text())["max_length"]))

    tokenizer = AutoTokenizer.from_pretrained(str(run / "final_model"))
    model = AutoModelForCausalLM.from_pretrained(str(run / "final_model")).eval()
    good, bad = tokenizer.convert_tokens_to_ids(["<|good|>", "<|bad|>"])
    scores, arithmetic = {}, {}
    for name, prefix in (("<|good|>", [good]), ("<|bad|>", [bad]), ("no token", [])):
        torch.manual_seed(seed)
        ids = torch.tensor([[tokenizer.eos_token_id, *prefix]] * n)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                 temperature=0.7, top_p=0.9, top_k=0, max_new_tokens=64, min_new_tokens=10,
                                 bad_words_ids=[[good], [bad]], pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
        texts = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
        arithmetic[name] = sum(bool(ARITHMETIC.search(t)) for t in texts) / len(texts)
        # rated as the training data were: sentence by sentence
        sentences = [s for text in texts for s in split_segments(text, "sentence") if s.strip()]
        scores[name] = example_losses(rater, encode, sentences, "cpu")
    return {name: (scores[name], arithmetic[name]) for name in scores}


def good_by_domain(run: Path, threshold: float) -> dict[str, tuple[int, int]]:
    """``{domain: (good training sentences, all training sentences)}``: the run's own sentences and scores (the
    scorer's cache answers; nothing is rated again)."""
    import numpy as np
    import yaml

    from effitrain.curriculum.row_scores import scorer_text_scores
    from effitrain.data.conditional import split_segments
    from effitrain.config.blocks import load_builtin_blocks
    from effitrain.registry import REGISTRY

    load_builtin_blocks()
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    dataset = REGISTRY.parse("dataset", cfg["dataset"], "dataset")
    control = dataset.params.control_tokens
    train = dataset.build()["train"]
    segments, domains = [], []
    for text, domain in zip(train["text"], train["domain"]):
        for segment in split_segments(text, control.segment):
            segments.append(segment)
            domains.append(domain)
    scores = scorer_text_scores(control.scorer, segments, seed=dataset.params.seed, key="bench", group="conditional",
                                what="the bench")
    good = np.asarray(scores) <= threshold
    return {d: (int(good[np.asarray(domains) == d].sum()), int((np.asarray(domains) == d).sum()))
            for d in sorted(set(domains))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench_conditional_training")
    parser.add_argument("--write", action="store_true", help="replace the section in docs/benchmarks.md")
    args, extra = parser.parse_known_args()
    import numpy as np

    from effitrain.paths import cache_dir

    rows, composition = [], ""
    for seed in args.seeds:
        run, threshold = train(seed, args.out, extra)
        if not composition:  # the labels depend on the data and the scorer, not on the training seed
            composition = "; ".join(f"{d} {g} of {n}" for d, (g, n) in good_by_domain(run, threshold).items())
        proxies = sorted((cache_dir("conditional")).glob("proxy-*"), key=os.path.getmtime)
        scores = sample_scores(run, proxies[-1], seed, args.samples)
        for name, (values, share_arithmetic) in scores.items():
            values = np.asarray(values)
            cell = name.replace("|", "\\|")  # <|good|> inside a table row
            rows.append(f"| {seed} | {cell} | {len(values)} | {values.mean():.3f} | {(values <= threshold).mean():.3f} | "
                        f"{threshold:.3f} | {share_arithmetic:.2f} |")
    table = "\n".join(["| seed | conditioned on | sampled sentences | mean proxy loss | share at or under the threshold "
                       "| threshold | samples with arithmetic |", "|---|---|---|---|---|---|---|", *rows])
    print(table)
    print(f"<|good|> training sentences by domain: {composition}")
    if args.write:
        from _sections import replace_marked_section

        command = " ".join(["OMP_NUM_THREADS=1 python scripts/bench_conditional_training.py", "--seeds",
                            *map(str, args.seeds), "--samples", str(args.samples), *extra, "--write"])
        section = (f"{START}\n## Conditional training: samples conditioned on <|good|> / <|bad|>\n\n`{command}` "
                   f"(tiny Llama from scratch, CPU). {args.samples} samples of 64 tokens per prefix (temperature "
                   f"0.7, top-p 0.9, control tokens banned), split into sentences, each rated by the run's own "
                   f"perplexity proxy (the scorer that labelled the training sentences; lower is better). Samples with arithmetic: the share with 'a op b =' "
                   f"in them. The <|good|> training sentences by domain: {composition}.\n\n{table}\n{END}\n")
        replace_marked_section(REPO / "docs" / "benchmarks.md", START, END, section)


if __name__ == "__main__":
    main()
