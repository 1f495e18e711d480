#!/usr/bin/env python
"""What the `in_context_pretraining` and `meco` curricula do to the demo corpus's training data (no training).

In-context chains: how many paths the traversal makes, how many documents the duplicate filter drops, how long each
phase takes, and how related neighbouring documents are in chain order compared with a shuffled order (cosine
similarity of the TF-IDF vectors of consecutive documents -- not the embeddings the chains are built from; share of consecutive pairs from one domain).  MeCo: the
rows of both packings and the share of metadata tokens (which carry no loss).

    python scripts/stats_curriculum_ctx.py                          # the default demo corpus, seq_len 128
    python scripts/stats_curriculum_ctx.py dataset.max_docs_per_domain=500
    python scripts/stats_curriculum_ctx.py --write docs/curricula.md  # replace the marked section

Extra ``key=value`` arguments are config overrides (dataset, model tokenizer).  Timings are wall seconds of one run on
this machine, for scale only.
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

SECTION_START = "<!-- stats_curriculum_ctx:start -->"
SECTION_END = "<!-- stats_curriculum_ctx:end -->"


def adjacent_similarity(features, order) -> float:
    """Mean cosine similarity of consecutive documents (the vectors are L2-normalised)."""
    a, b = features[order[:-1]], features[order[1:]]
    return float(np.asarray(a.multiply(b).sum(axis=1)).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", type=Path, help="replace the marked section of this markdown file")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from effitrain.config.compose import compose_config
    from effitrain.config.spec import validate
    from effitrain.curriculum.in_context import chain_order, embed_documents, in_batches
    from effitrain.curriculum.meco import conditioned_rows
    from effitrain.data.splits import build_packed_splits
    from datasets import DatasetDict

    composed = compose_config(["+recipe=in_context_pretraining", *args.overrides])
    spec = validate(composed.cfg, composed.recipes)
    params = spec.block("curriculum").params
    pool = spec.block("dataset").build()
    tokenizer, packed_train, _ = build_packed_splits(spec.block("dataset").params, spec.block("model").params,
                                                     DatasetDict(train=pool["train"], eval=pool["eval"]),
                                                     tokenizer_corpus=pool["train"])
    docs = pool["train"]
    texts, domains = docs["text"], np.asarray(docs["domain"])

    t0 = time.perf_counter()
    features, vectors, embedding = embed_documents(texts, n_features=params.n_features, embed_dims=params.embed_dims)
    t1 = time.perf_counter()
    kept, path_of, spec = chain_order(in_batches(vectors), len(texts), embedding.dims, texts,
                                      neighbors=params.neighbors, index=params.index, nprobe=params.nprobe,
                                      dedup_threshold=params.dedup_threshold)
    t2 = time.perf_counter()
    kept = kept.tolist()
    lengths = np.bincount(path_of)
    chain = range(len(texts))  # every document is on one path
    names, counts = np.unique(domains[sorted(set(chain) - set(kept))], return_counts=True)
    dropped_by_domain = ", ".join(f"{n} {c}" for n, c in zip(names.tolist(), counts.tolist())) or "none"
    shuffled = [np.random.default_rng(s).permutation(len(texts)) for s in range(5)]
    sim_chain = adjacent_similarity(features, np.asarray(kept))
    sim_random = float(np.median([adjacent_similarity(features, o) for o in shuffled]))
    same_chain = float(np.mean(domains[kept[:-1]] == domains[kept[1:]]))
    same_random = float(np.median([np.mean(domains[o[:-1]] == domains[o[1:]]) for o in shuffled]))

    meco = validate(compose_config(["+recipe=meco", *args.overrides]).cfg).block("curriculum").params
    conditioned = conditioned_rows(docs, tokenizer, int(packed_train.features["input_ids"].length),
                                   metadata_field=meco.metadata_field, prefix=meco.prefix, suffix=meco.suffix)
    metadata_share = 1.0 - float(np.asarray(conditioned["mask"]).mean())

    lines = [
        SECTION_START,
        "### Measured on the demo corpus (no training)",
        "",
        f"`{' '.join(['python scripts/stats_curriculum_ctx.py', *args.overrides])}`",
        f"({platform.machine()}, Python {platform.python_version()}; timings are one run's wall seconds, for scale)",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| training documents | {len(texts)} |",
        f"| in-context: paths (chains) | {len(lengths)} (length median {int(np.median(lengths))}, max "
        f"{int(lengths.max())}; {int((lengths == 1).sum())} single documents) |",
        f"| in-context: documents dropped as near-duplicates | {len(chain) - len(kept)} ({dropped_by_domain}) |",
        f"| in-context: features + embeddings / kNN ({spec}) + traversal + filter seconds | {t1 - t0:.2f} / "
        f"{t2 - t1:.2f} |",
        f"| in-context: cosine similarity of consecutive documents, chain order vs shuffled (median of 5) | "
        f"{sim_chain:.3f} vs {sim_random:.3f} |",
        f"| in-context: consecutive documents from one domain, chain order vs shuffled | "
        f"{same_chain:.3f} vs {same_random:.3f} |",
        f"| MeCo: conditioned rows vs plain rows | {len(conditioned['rows'])} vs {len(packed_train)} |",
        f"| MeCo: share of metadata tokens (no loss) in conditioned rows | {metadata_share:.4f} |",
        SECTION_END,
    ]
    section = "\n".join(lines) + "\n"
    print(section)
    if args.write:
        replace_marked_section(args.write, SECTION_START, SECTION_END, section)


if __name__ == "__main__":
    main()
