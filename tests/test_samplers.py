"""The resumable distributed samplers: layout, epochs, exact resume, and process/accumulation equivalence."""

from __future__ import annotations

from itertools import islice

import numpy as np
import pytest

from effitrain.curriculum.samplers import SequentialSampler, ShuffleSampler, build_sequential, build_shuffle
from effitrain.config.blocks import load_builtin_blocks
from effitrain.registry import REGISTRY, ConfigError

ROWS = list(range(103))  # stands in for a packed dataset: the builders only use its length


def _sampler(cls=ShuffleSampler, *, mb=4, accum=1, world=1, rank=0, seed=7, rows=len(ROWS)):
    return cls(rows, seed=seed, micro_batch_size=mb, grad_accum=accum, world_size=world, rank=rank)


def _steps(samplers, n_steps, accum):
    """The set of rows each optimizer step trains on, all ranks and micro steps together."""
    iters = [iter(s) for s in samplers]
    steps = []
    for _ in range(n_steps):
        rows = []
        for _ in range(accum):
            for it in iters:
                rows.extend(next(it))
        steps.append(sorted(rows))
    return steps


def test_layout_matches_the_documented_formula():
    s = _sampler(mb=3, accum=2, world=2, rank=1)
    order = np.random.default_rng([7, 0]).permutation(len(ROWS))
    got = list(islice(iter(s), 4))  # two optimizer steps of rank 1
    for k, batch in enumerate(got):
        start = (k * 2 + 1) * 3
        assert batch == order[start:start + 3].tolist()


def test_one_process_with_accumulation_equals_two_processes():
    one = _steps([_sampler(mb=4, accum=2, world=1)], 30, accum=2)
    two = _steps([_sampler(mb=4, accum=1, world=2, rank=r) for r in range(2)], 30, accum=1)
    assert one == two  # 30 steps of 8 rows cross two epochs of 103 rows (12 steps each)


def test_ranks_are_disjoint_and_the_tail_is_dropped():
    world, mb = 3, 5  # global batch 15: 6 steps per epoch, 13 rows dropped each epoch
    samplers = [_sampler(mb=mb, world=world, rank=r) for r in range(world)]
    assert samplers[0].steps_per_epoch == 6
    epoch0 = _steps(samplers, 6, accum=1)
    flat = [i for step in epoch0 for i in step]
    assert len(flat) == len(set(flat)) == 90
    assert samplers[0].epoch == 0
    epoch1 = _steps(samplers, 1, accum=1)[0]
    assert samplers[0].epoch == 1
    order1 = np.random.default_rng([7, 1]).permutation(len(ROWS))
    assert epoch1 == sorted(order1[:15].tolist())  # a new permutation, from its start


@pytest.mark.parametrize("cls", [ShuffleSampler, SequentialSampler])
@pytest.mark.parametrize("k", [0, 5, 25, 26, 51])  # 25 = one epoch of 4-row batches over 103 rows
def test_resume_continues_with_exactly_the_next_batch(cls, k):
    reference = list(islice(iter(_sampler(cls)), k + 30))
    first = _sampler(cls)
    it = iter(first)
    assert list(islice(it, k)) == reference[:k]
    state = first.state_dict()
    assert set(state) >= {"epoch", "position"}

    resumed = _sampler(cls)
    resumed.load_state_dict(dict(state))
    assert list(islice(iter(resumed), 30)) == reference[k:k + 30]
    assert list(islice(it, 30)) == reference[k:k + 30]  # saving state does not disturb the original


def test_resume_with_another_world_size_and_same_global_batch():
    reference = _steps([_sampler(mb=4, accum=2, world=1)], 20, accum=2)
    single = _sampler(mb=4, accum=2, world=1)
    _steps([single], 7, accum=2)
    state = single.state_dict()
    ranks = [_sampler(mb=4, accum=1, world=2, rank=r) for r in range(2)]
    for s in ranks:
        s.load_state_dict(state)
    assert _steps(ranks, 13, accum=1) == reference[7:]

    other = _sampler(mb=3, accum=1, world=1)
    with pytest.raises(ConfigError, match="global batch"):
        other.load_state_dict(state)
    with pytest.raises(ConfigError, match="data changed"):
        _sampler(mb=4, accum=2, rows=200).load_state_dict(state)


def test_sequential_order_and_seed_independence():
    s = _sampler(SequentialSampler, mb=4, seed=1)
    assert list(islice(iter(s), 3)) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    a = list(islice(iter(_sampler(seed=1)), 3))
    b = list(islice(iter(_sampler(seed=2)), 3))
    assert a != b


def test_builders_through_the_registry_and_small_data_error():
    load_builtin_blocks()
    layout = dict(seed=0, micro_batch_size=4, grad_accum=2, world_size=2, rank=1)
    for name, cls in (("shuffle", ShuffleSampler), ("sequential", SequentialSampler)):
        sampler = REGISTRY.parse("curriculum", {"name": name}).build(ROWS, **layout)
        assert isinstance(sampler, cls) and sampler.hook is None and sampler.epoch == 0
        assert len(next(iter(sampler))) == 4
    assert isinstance(build_shuffle(None, ROWS, **layout), ShuffleSampler)
    assert isinstance(build_sequential(None, ROWS, **layout), SequentialSampler)
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        build_shuffle(None, list(range(10)), seed=0, micro_batch_size=4, grad_accum=2, world_size=2, rank=0)
