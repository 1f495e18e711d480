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
    scores = {}
    for name, prefix in (("<|good|>", [good]), ("<|bad|>", [bad]), ("no token", [])):
        torch.manual_seed(seed)
        ids = torch.tensor([[tokenizer.eos_token_id, *prefix]] * n)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                 temperature=0.7, top_p=0.9, top_k=0, max_new_tokens=64, min_new_tokens=10,
                                 bad_words_ids=[[good], [bad]], pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
        texts = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
        # rated as the training data were: sentence by sentence
        sentences = [s for text in texts for s in split_segments(text, "sentence") if s.strip()]
        scores[name] = example_losses(rater, encode, sentences, "cpu")
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench_conditional_training")
    parser.add_argument("--write", action="store_true", help="replace the section in docs/benchmarks.md")
    args, extra = parser.parse_known_args()
    import numpy as np

    from effitrain.paths import cache_dir

    rows = []
    for seed in args.seeds:
        run, threshold = train(seed, args.out, extra)
        proxies = sorted((cache_dir("conditional")).glob("proxy-*"), key=os.path.getmtime)
        scores = sample_scores(run, proxies[-1], seed, args.samples)
        for name, values in scores.items():
            values = np.asarray(values)
            cell = name.replace("|", "\\|")  # <|good|> inside a table row
            rows.append(f"| {seed} | {cell} | {len(values)} | {values.mean():.3f} | {(values <= threshold).mean():.3f} | "
                        f"{threshold:.3f} |")
    table = "\n".join(["| seed | conditioned on | sampled sentences | mean proxy loss | share at or under the threshold "
                       "| threshold |", "|---|---|---|---|---|---|", *rows])
    print(table)
    if args.write:
        from _sections import replace_marked_section

        command = " ".join(["OMP_NUM_THREADS=1 python scripts/bench_conditional_training.py", "--seeds",
                            *map(str, args.seeds), "--samples", str(args.samples), *extra, "--write"])
        section = (f"{START}\n## Conditional training: samples conditioned on <|good|> / <|bad|>\n\n`{command}` "
                   f"(tiny Llama from scratch, CPU). {args.samples} samples of 64 tokens per prefix (temperature "
                   f"0.7, top-p 0.9, control tokens banned), split into sentences, each rated by the run's own "
                   f"perplexity proxy (the scorer that labelled the training sentences; lower is better).\n\n{table}\n{END}\n")
        replace_marked_section(REPO / "docs" / "benchmarks.md", START, END, section)


if __name__ == "__main__":
    main()
