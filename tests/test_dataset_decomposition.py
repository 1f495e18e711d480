"""Dataset decomposition (2405.13226): documents cut alone into power-of-two pieces, one length bucket per step with
constant tokens, short buckets early in every cycle, and a run resumed in the middle that sees the same batches."""

from __future__ import annotations

import json
from itertools import islice

import numpy as np
import pytest

from conftest import sigterm_after_step
from effitrain.config.compose import compose_config
from effitrain.config.rules import check_rules
from effitrain.config.spec import validate
from effitrain.curriculum.decomposition import DecompositionHook, DecompositionSampler, largest_remainder
from effitrain.data.decompose import decompose
from effitrain.registry import ConfigError


class CharTokenizer:
    """One token per character (its code point), end-of-text 0: a document's length in tokens is known exactly."""
    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=False, return_attention_mask=False):
        return {"input_ids": [[ord(c) for c in t] for t in texts]}

    def get_vocab(self):
        return {chr(i): i for i in range(1, 128)}


# ------------------------------------------------------------------------------------------- cutting documents
def test_a_document_is_cut_along_the_binary_representation_of_its_length():
    rng = np.random.default_rng(0)
    assert decompose(200, min_len=8, max_len=128, rng=rng) == [128, 64, 8]   # 200 = 128 + 64 + 8
    assert decompose(255, min_len=8, max_len=128, rng=rng) == [128, 64, 32, 16, 8]  # 7 tokens dropped
    assert decompose(7, min_len=8, max_len=128, rng=rng) == []


def test_a_document_longer_than_the_longest_bucket_is_recut_with_short_pieces_more_likely():
    """The authors' odds for a piece of a long document: k = max, max-1, ... weighted 1, 2, 4, ..."""
    rng = np.random.default_rng(0)
    first = [decompose(64, min_len=8, max_len=32, rng=rng)[0] for _ in range(7000)]
    counts = {n: first.count(n) for n in (8, 16, 32)}
    assert counts[8] > counts[16] > counts[32]  # expected 4000 : 2000 : 1000
    assert abs(counts[8] / 7000 - 4 / 7) < 0.03
    pieces = decompose(1000, min_len=8, max_len=32, rng=rng)
    assert all(p in (8, 16, 32) for p in pieces) and 1000 - 8 < sum(pieces) <= 1000


def test_packed_rows_hold_pieces_of_single_documents(tmp_path):
    import datasets

    from effitrain.data.decompose import pack_decomposed

    # document i is written with letter i only, so a piece that mixed documents would hold two letters
    lengths = [199, 63, 40, 300, 15, 127, 64, 31]
    docs = datasets.Dataset.from_dict({"id": [str(i) for i in range(len(lengths))],
                                       "text": [chr(65 + i) * n for i, n in enumerate(lengths)],
                                       "domain": ["prose"] * len(lengths)})
    packed = pack_decomposed(docs, CharTokenizer(), 32, 8, seed=0, cache_dir=tmp_path)
    ids = np.asarray(packed["input_ids"])
    piece_len = np.asarray(packed["piece_len"])
    assert set(piece_len.tolist()) <= {8, 16, 32} and ids.shape[1] == 32
    for row, length in zip(ids, piece_len):
        for piece in row.reshape(-1, length):
            letters = set(piece[piece != 0].tolist())
            assert len(letters) == 1                        # one document per piece
            assert (piece[:-1] != 0).all()                  # end-of-text can only close a piece
    # every token of the packed pieces is accounted for by the cut of its document (with its end-of-text token)
    expected = {}
    for i, n in enumerate(lengths):
        for p in decompose(n + 1, min_len=8, max_len=32, rng=np.random.default_rng([0, 0, i])):
            expected[p] = expected.get(p, 0) + 1
    got = {int(l): int((piece_len == l).sum()) * 32 // int(l) for l in np.unique(piece_len)}
    assert all(got[l] == expected[l] // (32 // l) * (32 // l) for l in got)  # incomplete rows dropped only


# ------------------------------------------------------------------------------------------- the length curriculum
def _sampler(rows_per_bucket, *, max_steps=400, cycles=1, odds_base=2.0, micro=2, accum=1, world=1, rank=0):
    labels = np.concatenate([np.full(n, length) for length, n in rows_per_bucket.items()])
    return DecompositionSampler(labels, max_steps=max_steps, cycles=cycles, odds_base=odds_base, seed=3,
                                micro_batch_size=micro, grad_accum=accum, world_size=world, rank=rank)


def test_quotas_follow_the_buckets_tokens_and_sum_to_the_cycle():
    assert largest_remainder(10, np.array([1.0, 1.0, 1.0])).tolist() == [4, 3, 3]
    s = _sampler({8: 100, 16: 300, 32: 600}, max_steps=100, cycles=4)  # 25 steps per cycle
    assert s.steps_per_cycle == 25 and s.quota.tolist() == [3, 7, 15]  # 2.5, 7.5, 15: the tie to the first
    for cycle in range(4):
        assert np.bincount(s.cycle_buckets(cycle), minlength=3).tolist() == [3, 7, 15]


def test_short_buckets_come_first_in_every_cycle_with_pow2_odds_and_not_without():
    equal = {8: 400, 16: 400, 32: 400, 64: 400}
    curriculum = _sampler(equal, max_steps=800, cycles=2)
    for cycle in range(2):
        order = curriculum.cycle_buckets(cycle)
        mean_position = [np.flatnonzero(order == k).mean() for k in range(4)]
        assert mean_position == sorted(mean_position)          # shortest earliest, longest latest
        assert (order[-40:] == 3).mean() > 0.9                  # the cycle ends on the longest bucket
    flat = _sampler(equal, max_steps=800, cycles=2, odds_base=1.0).cycle_buckets(0)
    assert abs(np.flatnonzero(flat == 0).mean() - np.flatnonzero(flat == 3).mean()) < 40  # uniform interleaving


def test_every_step_takes_one_bucket_with_constant_tokens():
    import torch

    s = _sampler({8: 64, 16: 64, 32: 64}, max_steps=30, cycles=1, micro=2, accum=2)
    hook = DecompositionHook(s)
    labels = np.concatenate([np.full(64, n) for n in (8, 16, 32)])
    it = iter(s)

    class State:
        metrics: dict = {}

    st = State()
    for step in range(30):
        st.step = step
        length = s.length_of_step(step)
        for _ in range(2):
            rows = next(it)
            assert set(labels[rows].tolist()) == {length}
            st.batch = {"input_ids": torch.zeros(2, 32, dtype=torch.long), "labels": torch.zeros(2, 32)}
            hook.on_batch_start(st)
            assert tuple(st.batch["input_ids"].shape) == (2 * 32 // length, length)  # rows = tokens / length
            assert st.batch["input_ids"].numel() == 64
        st.step = step + 1
        hook.on_step_end(st)
        assert st.metrics["seq_len"] == length


def test_resuming_the_sampler_mid_cycle_continues_the_same_batches():
    buckets = {8: 40, 16: 50, 32: 30}
    whole = list(islice(_sampler(buckets, max_steps=60, cycles=3, accum=2), 100))
    first = _sampler(buckets, max_steps=60, cycles=3, accum=2)
    seen = list(islice(first, 37))  # inside step 18, in the first cycle
    resumed = _sampler(buckets, max_steps=60, cycles=3, accum=2)
    resumed.load_state_dict(first.state_dict())
    seen += list(islice(resumed, 63))
    assert seen == whole
    # a launch with another train.max_steps keeps the checkpoint's cycles: the planned past does not move
    longer = _sampler(buckets, max_steps=120, cycles=3, accum=2)
    longer.load_state_dict(first.state_dict())
    assert longer.steps_per_cycle == 20
    assert list(islice(longer, 63)) == seen[37:]


def test_the_curriculum_and_the_packing_are_refused_apart():
    def check(overrides):
        c = compose_config(overrides)
        check_rules(validate(c.cfg, c.recipes))

    check(["+recipe=dataset_decomposition"])
    with pytest.raises(ConfigError, match=r"needs dataset.packing=decompose|set dataset.packing=decompose"):
        check(["curriculum=dataset_decomposition"])
    with pytest.raises(ConfigError, match=r"only curriculum=dataset_decomposition cuts them apart"):
        check(["dataset.packing=decompose"])
    with pytest.raises(ConfigError, match=r"^dataset.seq_len: packing=decompose needs a power of two, got 96"):
        check(["+recipe=dataset_decomposition", "dataset.seq_len=96"])
    with pytest.raises(ConfigError, match=r"timeline.seq_len: dataset_decomposition sets the sequence length"):
        check(["+recipe=dataset_decomposition",
               "+timeline.seq_len={unit: step, points: [{at: 0, value: 64}]}"])


# ------------------------------------------------------------------------------------------- a real run
@pytest.mark.slow
def test_a_decomposition_run_stopped_mid_cycle_resumes_with_the_same_lengths_and_losses(tmp_path, train_in_process):
    """Six steps in two cycles of three; the second run is stopped by SIGTERM after step 2 (inside the first
    cycle), saves, and `resume=auto` finishes it: the later losses and logged lengths are the uninterrupted run's."""
    run = ["+recipe=dataset_decomposition", "curriculum.cycles=2", "scheduler=constant", "train.max_steps=6"]

    def lines(run_dir):
        return {l["step"]: (l["loss"], l["seq_len"]) for l in
                map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in l}

    full, split = tmp_path / "full", tmp_path / "split"
    assert train_in_process(run, full)["finished"]
    with sigterm_after_step(2):
        assert not train_in_process(run, split)["finished"]
    assert sorted(lines(split)) == [1, 2]
    assert train_in_process([*run, "resume=auto"], split)["finished"]
    assert lines(split) == lines(full) and sorted(lines(full)) == [1, 2, 3, 4, 5, 6]
    assert len({length for _, length in lines(full).values()}) > 1  # the run did change its sequence length


@pytest.mark.slow
def test_the_recipe_on_token_shards_trains_the_steps_of_the_in_memory_path(tmp_path):
    """`+recipe=dataset_decomposition` on a corpus of files with `data.executor=local data.tasks=2`: the shards hold
    the in-memory path's decomposed rows with their piece lengths (tests/test_data_engine.py), so the curriculum
    draws the same bucket at every step and the run logs the same lengths and losses."""
    import sys

    from conftest import REPO, TINY
    from effitrain.pipeline import run as train

    sys.path.insert(0, str(REPO / "scripts"))
    import make_corpus

    def train_in_process(overrides, run_dir):  # TINY without the demo corpus's key
        composed = compose_config([*(o for o in TINY if not o.startswith("dataset.max_docs")), *overrides,
                                   f"run_dir={run_dir}"])
        return train(composed.cfg, run_dir=run_dir, argv=["effitrain", *overrides], recipes=composed.recipes)

    corpus = tmp_path / "corpus"
    make_corpus.generate(corpus, docs=300, files=4, fmt="jsonl", seed=0, ids=True, domains=make_corpus.DOMAINS[:3])
    run = ["+recipe=dataset_decomposition", "curriculum.cycles=2", "scheduler=constant", "train.max_steps=6",
           "dataset=local", f"dataset.path={corpus}", "dataset.domain_field=domain"]

    def lines(run_dir):
        return {l["step"]: (l["loss"], l["seq_len"]) for l in
                map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in l}

    in_memory, sharded = tmp_path / "memory", tmp_path / "sharded"
    assert train_in_process(run, in_memory)["finished"]
    assert train_in_process([*run, "data.executor=local", "data.tasks=2"], sharded)["finished"]
    summary = json.loads((sharded / "summary.json").read_text())
    assert summary["selection"]["token_shards"]  # it did train from shards
    expected, got = lines(in_memory), lines(sharded)
    assert sorted(got) == [1, 2, 3, 4, 5, 6] and len({length for _, length in got.values()}) > 1
    assert [got[s][1] for s in got] == [expected[s][1] for s in got]
    assert [got[s][0] for s in got] == pytest.approx([expected[s][0] for s in got], abs=1e-6)


def test_plan_marks_the_cycles_and_says_the_length_varies():
    from effitrain.plan import format_section, plan_sections

    composed = compose_config(["+recipe=dataset_decomposition", "train.max_steps=40", "curriculum.cycles=4"])
    section, = plan_sections(composed.cfg, composed.recipes)
    assert [r["step"] for r in section.rows if "decomposition cycle" in r["what"]] == [10, 20, 30]
    assert format_section(section).endswith("short ones first in each cycle of 10 steps (the column shows the packed "
                                            "row length)")
