"""Procedural pre-pretraining (2502.19249): generated formal languages that are what they claim to be, deterministic
from a seed, and a phase of the timeline in which every batch comes from them — then never again."""

from __future__ import annotations

from itertools import islice

import numpy as np
import pytest

from effitrain.config.compose import compose_config
from effitrain.config.rules import check_rules
from effitrain.config.spec import validate
from effitrain.curriculum.phases import DomainPhaseSampler
from effitrain.data.procedural import generate, procedural_documents, with_procedural
from effitrain.registry import ConfigError


# ------------------------------------------------------------------------------------------- the languages
def test_shuffle_dyck_closes_only_open_brackets_of_each_type_and_respects_the_depth():
    k = 5
    seq = generate("shuffle_dyck", 0, seed=1, symbols=k, length=4000)
    assert len(seq) == 4000 and set(seq) <= set(range(2 * k))
    counts = np.zeros(k, int)
    crossed = False
    stack: list[int] = []
    for s in seq:
        if s < k:
            counts[s] += 1
            stack.append(s)
        else:
            counts[s - k] -= 1
            assert counts[s - k] >= 0            # a closing bracket of a type that is open
            crossed |= stack[-1] != s - k        # shuffle: not always the most recent one (cross-serial)
            stack.remove(s - k)
        assert counts.sum() <= 8                 # the authors' max_depth
    assert crossed
    assert seq == generate("shuffle_dyck", 0, seed=1, symbols=k, length=4000)  # a function of seed and index
    assert seq != generate("shuffle_dyck", 1, seed=1, symbols=k, length=4000)


def test_dyck_is_properly_nested_and_copy_repeats_its_word():
    k = 4
    stack: list[int] = []
    for s in generate("dyck", 0, seed=0, symbols=k, length=3000):
        if s < k:
            stack.append(s)
            assert len(stack) <= 16
        else:
            assert stack.pop() == s - k  # the most recent open bracket closes first
    seq = generate("copy", 0, seed=0, symbols=k, length=10_000)
    rng = np.random.default_rng([0, 2, 0])  # the generator of document 0 of 'copy': the first word's length
    n = int(rng.integers(10, 10_000 // 2 + 1))
    assert seq[:n] == seq[n:2 * n]


def test_generated_documents_join_the_train_split_as_their_own_domain():
    import datasets

    docs = procedural_documents(3, language="shuffle_dyck", seed=0, symbols=64, length=10)
    assert docs["domain"] == ["procedural"] * 3 and len(docs["text"][0].split()) == 10
    assert all(0 <= int(x) < 128 for x in docs["text"][0].split())

    class Params:
        procedural_docs, procedural_language, procedural_seed = 3, "shuffle_dyck", 0
        procedural_symbols, procedural_length = 64, 10

    train = datasets.Dataset.from_dict({"id": ["a"], "text": ["hello"], "domain": ["prose"]})
    joined = with_procedural(train, Params)
    assert joined["domain"] == ["prose", "procedural", "procedural", "procedural"]
    assert joined["text"][1:] == docs["text"]
    Params.procedural_docs = 0
    assert with_procedural(train, Params) is train


# ------------------------------------------------------------------------------------------- the phase
def _phase_sampler(domains, *, until=3, micro=2, accum=2):
    spec = validate(compose_config(["curriculum=domain_phases", "+curriculum.phases={procedural: [procedural]}",
                                    f"+timeline.phases={{unit: step, intervals: {{procedural: [0, {until}]}}}}",
                                    "dataset.procedural_docs=4"]).cfg)
    timeline = spec.timeline.resolve(max_steps=100, tokens_per_step=1)
    return DomainPhaseSampler(np.asarray(domains), {"procedural": ["procedural"]}, timeline, seed=0,
                              micro_batch_size=micro, grad_accum=accum, world_size=1, rank=0)


def test_the_procedural_phase_takes_every_batch_then_none():
    domains = np.array(["procedural"] * 10 + ["prose"] * 12 + ["code"] * 12)
    sampler = _phase_sampler(domains)
    batches = list(islice(sampler, 2 * 12))  # 12 steps of 2 micro-batches of 2 rows
    per_step = [sum(batches[2 * s:2 * s + 2], []) for s in range(12)]
    for step, rows in enumerate(per_step):
        kinds = set(domains[rows].tolist())
        assert kinds == {"procedural"} if step < 3 else "procedural" not in kinds
    corpus = sum(per_step[3:9], [])  # 6 steps x 4 rows = one pass over the 24 corpus rows
    assert sorted(corpus) == list(range(10, 34))  # shuffled like the baseline: each row once per pass
    assert corpus != sorted(corpus)


def test_resuming_inside_the_phase_continues_the_same_batches():
    domains = np.array(["procedural"] * 10 + ["prose"] * 12 + ["code"] * 12)
    whole = list(islice(_phase_sampler(domains), 30))
    first = _phase_sampler(domains)
    seen = list(islice(first, 5))  # inside step 2, the last of the phase
    resumed = _phase_sampler(domains)
    resumed.load_state_dict(first.state_dict())
    assert seen + list(islice(resumed, 25)) == whole


def test_phases_without_their_interval_or_their_rows_are_refused():
    c = compose_config(["+recipe=procedural_warmup"])
    check_rules(validate(c.cfg, c.recipes))
    c = compose_config(["curriculum=domain_phases", "+curriculum.phases={warmup: [procedural]}",
                        "dataset.procedural_docs=4",
                        "+timeline.phases={unit: fraction, intervals: {procedural: [0, 0.1]}}"])
    with pytest.raises(ConfigError, match=r"curriculum.phases.warmup: timeline.phases declares no interval "
                                          r"'warmup'; declared: procedural"):
        check_rules(validate(c.cfg, c.recipes))
    with pytest.raises(ConfigError, match=r"^curriculum.phases: phase 'procedural' has no rows of its domains"):
        _phase_sampler(np.array(["prose"] * 12 + ["code"] * 12))
