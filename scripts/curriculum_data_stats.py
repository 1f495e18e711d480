"""What the data of the dataset_decomposition and procedural_warmup recipes looks like on the demo corpus.

Prints, for ``+recipe=dataset_decomposition``: rows and tokens per length bucket, each bucket's step quota per cycle
and the mean position of its steps in the first cycle (the length curriculum); for ``+recipe=procedural_warmup``:
tokens per generated document, the procedural rows, and the rows the procedural phase draws.

    python scripts/curriculum_data_stats.py [OVERRIDES ...]     # e.g. train.max_steps=400
"""

from __future__ import annotations

import sys

import numpy as np


def _packed(overrides: list[str]):
    from datasets import DatasetDict

    from effitrain.config.compose import compose_config
    from effitrain.config.spec import validate
    from effitrain.data.splits import build_packed_splits

    composed = compose_config(overrides)
    spec = validate(composed.cfg, composed.recipes)
    pool = spec.block("dataset").build()
    tokenizer, packed, _ = build_packed_splits(spec.block("dataset").params, spec.block("model").params,
                                               DatasetDict(train=pool["train"], eval=pool["eval"]),
                                               tokenizer_corpus=pool["train"])
    return spec, tokenizer, packed


def decomposition(extra: list[str]) -> None:
    from effitrain.curriculum.decomposition import DecompositionSampler
    from effitrain.data.sources import arrow_column

    spec, _, packed = _packed(["+recipe=dataset_decomposition", *extra])
    t, c = spec.train, spec.block("curriculum").params
    lengths = arrow_column(packed, "piece_len").to_numpy(zero_copy_only=False)
    sampler = DecompositionSampler(lengths, max_steps=t.max_steps, cycles=c.cycles, odds_base=c.odds_base,
                                   seed=t.seed, micro_batch_size=t.micro_batch_size, grad_accum=t.grad_accum,
                                   world_size=1, rank=0)
    order = sampler.cycle_buckets(0)
    seq_len = spec.block("dataset").params.seq_len
    print(f"dataset_decomposition: {len(lengths)} rows of {seq_len} tokens; {sampler.steps_per_cycle} steps per "
          f"cycle, {c.cycles} cycles, odds base {c.odds_base}")
    print("length   rows    tokens  pieces  quota/cycle  mean step in cycle 0")
    for k, length in enumerate(sampler.lengths):
        rows = int((lengths == length).sum())
        where = np.flatnonzero(order == k)
        mean = f"{where.mean():.1f}" if len(where) else "-"
        print(f"{length:6d} {rows:6d} {rows * seq_len:9d} {rows * seq_len // length:7d} {sampler.quota[k]:12d}  {mean}")


def procedural(extra: list[str]) -> None:
    spec, tokenizer, packed = _packed(["+recipe=procedural_warmup", *extra])
    from effitrain.data.packing import domain_array
    from effitrain.data.procedural import procedural_documents

    d = spec.block("dataset").params
    docs = procedural_documents(8, language=d.procedural_language, seed=d.procedural_seed,
                                symbols=d.procedural_symbols, length=d.procedural_length)
    per_doc = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in docs["text"]]
    rows = int((domain_array(packed) == "procedural").sum())
    t = spec.train
    timeline = spec.timeline.resolve(max_steps=t.max_steps, tokens_per_step=1)
    (_, start, end), = [p for p in timeline.phases if p[0] == "procedural"]
    drawn = (end - start) * t.micro_batch_size * t.grad_accum
    print(f"procedural_warmup: {d.procedural_docs} documents of {d.procedural_length} symbols, "
          f"{np.mean(per_doc):.1f} tokens each (mean of 8); {rows} procedural rows of {d.seq_len} tokens; the phase "
          f"is steps [{start}, {end}) of {t.max_steps} and draws {drawn} rows "
          f"({'no row repeats' if drawn <= rows else 'rows repeat: raise dataset.procedural_docs'})")


if __name__ == "__main__":
    decomposition(sys.argv[1:])
    procedural(sys.argv[1:])
