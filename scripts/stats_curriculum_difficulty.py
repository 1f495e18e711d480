#!/usr/bin/env python
"""What the difficulty score of `difficulty_curriculum` / `quality_curriculum_avg` makes of the demo corpus (no
training of the main model): the proxy's loss per domain, and which domains fill the easiest share of the rows at
each competence the root pacing passes through.

    python scripts/stats_curriculum_difficulty.py                           # the default demo corpus, seq_len 128
    python scripts/stats_curriculum_difficulty.py --write docs/curricula.md  # replace the marked section

Extra ``key=value`` arguments are config overrides (dataset, model tokenizer, curriculum.scorer.*).  The scoring
time is one run's wall seconds on this machine (the pool proxy's training included unless it was cached), for scale.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from _sections import replace_marked_section  # noqa: E402

SECTION_START = "<!-- stats_curriculum_difficulty:start -->"
SECTION_END = "<!-- stats_curriculum_difficulty:end -->"
COMPETENCES = (0.01, 0.1, 0.25, 0.5, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", type=Path, help="replace the marked section of this markdown file")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from datasets import DatasetDict

    from effitrain.config.compose import compose_config
    from effitrain.config.spec import validate
    from effitrain.curriculum.row_scores import rank_difficulty, row_scores
    from effitrain.data.packing import domain_array
    from effitrain.data.splits import build_packed_splits

    spec = validate(compose_config(["+recipe=difficulty_curriculum", *args.overrides]).cfg)
    params = spec.block("curriculum").params
    pool = spec.block("dataset").build()
    tokenizer, packed, _ = build_packed_splits(spec.block("dataset").params, spec.block("model").params,
                                               DatasetDict(train=pool["train"], eval=pool["eval"]),
                                               tokenizer_corpus=pool["train"])
    t0 = time.perf_counter()
    scores = row_scores(params.scorer, params.domain_order, packed, tokenizer, seed=spec.train.seed,
                        key="curriculum")
    seconds = time.perf_counter() - t0
    order, _ = rank_difficulty(scores, spec.train.seed)
    domains = domain_array(packed)
    names = sorted(set(domains.tolist()))

    def shares(rows) -> str:
        return " / ".join(f"{np.mean(domains[rows] == d):.2f}" for d in names)

    lines = [
        SECTION_START,
        "### Measured on the demo corpus: what the proxy's loss calls easy (no training of the main model)",
        "",
        f"`{' '.join(['python scripts/stats_curriculum_difficulty.py', *args.overrides])}`",
        f"({platform.machine()}, Python {platform.python_version()}; scorer {params.scorer}; "
        f"{len(scores)} packed rows scored in {seconds:.0f} s, one run, for scale)",
        "",
        "| domain | rows | proxy loss per row: median (10th–90th percentile) |",
        "|---|---|---|",
    ]
    for d in names:
        s = scores[domains == d]
        lines.append(f"| {d} | {len(s)} | {np.median(s):.3f} ({np.percentile(s, 10):.3f}–{np.percentile(s, 90):.3f}) |")
    lines += ["", f"| competence c | rows in play | domain shares of the easiest c ({' / '.join(names)}) | "
                  f"of the hardest c (anti-curriculum) |", "|---|---|---|---|"]
    for c in COMPETENCES:
        n = max(1, int(np.ceil(c * len(order))))
        lines.append(f"| {c} | {n} | {shares(order[:n])} | {shares(order[::-1][:n])} |")
    lines.append(SECTION_END)
    section = "\n".join(lines) + "\n"
    print(section)
    if args.write:
        replace_marked_section(args.write, SECTION_START, SECTION_END, section)


if __name__ == "__main__":
    main()
