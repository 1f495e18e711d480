"""Curricula that re-pack the documents.

MeCo: every document is preceded by ``prefix + metadata + suffix`` whose tokens carry no loss; steps inside the
timeline's cool-down phase draw plain rows instead, starting exactly at the phase's first step; both streams resume
where they stopped.  In-context pre-training: the traversal visits every document once, always walking to the most
similar unvisited neighbour; documents are packed in chain order; the contexts resume like any shuffle.

A byte tokenizer (one id per UTF-8 byte, end-of-text 256) makes every expected row computable by hand.
"""

from __future__ import annotations

import numpy as np
import pytest

from effitrain.curriculum.in_context import (InContextSampler, chain_settings, chained_rows, document_features,
                                             drop_near_duplicates, in_batches, knn_arrays, traverse_csr, undirected)
from effitrain.curriculum.meco import MecoSampler, conditioned_rows
from effitrain.registry import ConfigError
from effitrain.timeline import parse_timeline

from conftest import EOS, ByteTokenizer


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def _documents(rows):
    import datasets

    return datasets.Dataset.from_dict({"id": [r[0] for r in rows], "text": [r[1] for r in rows],
                                       "domain": [r[2] for r in rows]})


# ============================================================================================== MeCo
def test_metadata_precedes_every_document_and_carries_no_loss():
    docs = _documents([("c1", "def f(): pass", "code"), ("c2", "x = 1", "code"), ("p1", "Hello.", "prose")])
    packed = conditioned_rows(docs, ByteTokenizer(), 8, metadata_field="domain", prefix="URL: ", suffix="\n\n")
    code_stream = (_bytes("URL: code\n\n") + _bytes("def f(): pass") + [EOS]
                   + _bytes("URL: code\n\n") + _bytes("x = 1") + [EOS])
    code_mask = [False] * 11 + [True] * 14 + [False] * 11 + [True] * 6
    n = len(code_stream) // 8  # 42 tokens: 5 rows of 8, the tail dropped as in packing; prose's 19 tokens: 2 rows
    assert np.asarray(packed["rows"]).tolist() == np.reshape(code_stream[:n * 8], (n, 8)).tolist() + \
        np.reshape((_bytes("URL: prose\n\n") + _bytes("Hello.") + [EOS])[:16], (2, 8)).tolist()
    assert np.asarray(packed["mask"][:n]).ravel().tolist() == code_mask[:n * 8]
    assert np.asarray(packed["domain"]).tolist() == ["code"] * 5 + ["prose"] * 2


def test_the_document_id_can_be_the_metadata():
    packed = conditioned_rows(_documents([("code/json/decoder.py", "x", "code")]), ByteTokenizer(), 4,
                              metadata_field="id", prefix="URL: ", suffix="\n")
    tokens = np.asarray(packed["rows"]).ravel().tolist()  # 26 + 2 tokens: exactly 7 rows of 4
    assert tokens == _bytes("URL: code/json/decoder.py\n") + _bytes("x") + [EOS]


def _meco_sampler(cooldown=(6, 8), grad_accum=2, mask=True, max_steps=8, **layout):
    """8 steps, cool-down [6, 8): 10 conditioned rows (ids 0..9, metadata on each row's first 2 tokens) and 8
    plain rows, 1 sequence per micro-batch."""
    timeline = parse_timeline({"phases": {"unit": "step", "intervals": {"conditioning": [0, cooldown[0]],
                                                                       "cooldown": list(cooldown)}}}) \
        .resolve(max_steps=max_steps, tokens_per_step=8)
    meta_mask = np.ones((10, 4), bool)
    meta_mask[:, :2] = False
    conditioned = {"rows": np.arange(40, dtype=np.int32).reshape(10, 4), "mask": meta_mask}
    plain = np.arange(100, 132, dtype=np.int32).reshape(8, 4)
    kw = {"seed": 0, "micro_batch_size": 1, "grad_accum": grad_accum, "world_size": 1, "rank": 0, **layout}
    return MecoSampler(conditioned, plain, timeline, cooldown_phase="cooldown", mask_metadata_loss=mask, **kw)


def test_metadata_disappears_exactly_at_the_cooldown_step():
    sampler = _meco_sampler()
    batches = iter(sampler)
    for step in range(8):
        for _ in range(2):
            rows = next(batches)
            tokens = sampler.train_rows[rows]
            if step < 6:  # conditioned rows: the ids 0..39 and a mask on their first two tokens
                assert tokens.max() < 40 and sampler.target_mask(rows)[:, :2].sum() == 0
            else:         # plain rows: the ids 100..131, trained on everywhere
                assert tokens.min() >= 100 and sampler.target_mask(rows) is None
    # 12 conditioned micro-batches from a stream of 10 rows (5 steps an epoch): an epoch and a bit; 4 plain ones
    assert sampler.state_dict()["drawn"] == {"conditioned": 12, "plain": 4}


def test_each_stream_sees_every_row_once_per_epoch():
    sampler = _meco_sampler(grad_accum=1, cooldown=(10, 18), max_steps=18)
    batches = iter(sampler)
    conditioned = [next(batches)[0] for _ in range(10)]
    plain = [next(batches)[0] for _ in range(8)]
    assert sorted(conditioned) == list(range(10)) and sorted(plain) == list(range(10, 18))


def test_the_hook_writes_minus_100_on_metadata_labels_only():
    import torch

    sampler = _meco_sampler()
    batches = iter(sampler)

    class State:
        batch = None

    state = State()
    for step in range(8):
        for _ in range(2):
            rows = next(batches)
            ids = torch.from_numpy(sampler.train_rows[rows]).long()
            state.batch = {"input_ids": ids, "labels": ids}
            sampler.hook.on_batch_start(state)
            expected = ids.clone()
            if step < 6:
                expected[:, :2] = -100
            assert torch.equal(state.batch["labels"], expected) and torch.equal(state.batch["input_ids"], ids)


def test_a_row_that_is_all_metadata_keeps_its_last_10_labels():
    import torch

    from effitrain.curriculum.meco import training_labels

    ids = torch.arange(24).reshape(2, 12)
    mask = np.zeros((2, 12), bool)
    mask[1, 5:] = True
    labels = training_labels(ids, mask)
    assert labels[0].tolist() == [-100, -100] + list(range(2, 12))
    assert labels[1].tolist() == [-100] * 5 + list(range(17, 24))


def test_without_masking_every_token_is_trained_on():
    sampler = _meco_sampler(mask=False)
    assert sampler.target_mask(next(iter(sampler))) is None


@pytest.mark.parametrize("stop_after", [3, 11, 12, 13])  # inside the conditioning, at and after the switch
def test_state_dict_round_trip_continues_both_streams(stop_after):
    full = [b for b, _ in zip(iter(_meco_sampler()), range(16))]
    first = _meco_sampler()
    seen = [b for _, b in zip(range(stop_after), iter(first))]  # range first: no batch taken past it
    resumed = _meco_sampler()
    resumed.load_state_dict(first.state_dict())
    seen += [b for b, _ in zip(iter(resumed), range(16 - stop_after))]
    assert seen == full


def test_two_processes_resume_what_one_process_with_accumulation_trained():
    """One process with grad_accum=2 stops after 7 steps; two processes with grad_accum=1 take the rest: together
    they train on the rows of the uninterrupted run, step by step."""
    full = [b for _, b in zip(range(16), iter(_meco_sampler()))]
    first = _meco_sampler()
    seen = [b for _, b in zip(range(14), iter(first))]
    ranks = [_meco_sampler(grad_accum=1, world_size=2, rank=r) for r in (0, 1)]
    for sampler in ranks:
        sampler.load_state_dict(first.state_dict())
    streams = [iter(s) for s in ranks]
    seen += [next(streams[0]), next(streams[1])]  # step 7: slot 0 on rank 0, slot 1 on rank 1
    assert seen == full


def test_resuming_with_another_layout_or_data_is_refused():
    state = _meco_sampler().state_dict()
    with pytest.raises(ConfigError, match=r"^resume: the checkpoint's batch layout \(micro_batch_size 1, grad_accum "
                                          r"2, world size 1\) cannot be continued by this run's \(1, 1, 1\)"):
        _meco_sampler(grad_accum=1).load_state_dict(state)
    with pytest.raises(ConfigError, match=r"^resume: the checkpoint.s MeCo sampler counted \[10, 9\] \(conditioned, plain\) rows, this run has \[10, 8\]"):
        _meco_sampler().load_state_dict({**state, "sizes": [10, 9]})


def test_a_cooldown_phase_missing_from_the_timeline_is_a_one_line_error():
    from effitrain.config.compose import compose_config
    from effitrain.config.rules import check_rules
    from effitrain.config.spec import validate

    composed = compose_config(["+recipe=meco", "curriculum.cooldown_phase=anneal"])
    with pytest.raises(ConfigError, match=r"^incompatible configuration \[meco_needs_its_cooldown_phase\]: "
                                          r"curriculum.cooldown_phase 'anneal' is not a phase of timeline.phases "
                                          r"\(declared: conditioning, cooldown\)"):
        check_rules(validate(composed.cfg, composed.recipes))
    with pytest.raises(ConfigError, match=r"^curriculum\.metadata_field"):
        validate(compose_config(["+recipe=meco", "curriculum.metadata_field=url"]).cfg)


# ============================================================================================== in-context
def knn_graph(features, k):
    """The curriculum's undirected kNN graph (exact index) of few vectors, as ``graph[i] = {j: similarity}``."""
    dense = np.asarray(features.todense(), dtype=np.float32)
    neighbours, sims, _ = knn_arrays(in_batches(dense), len(dense), dense.shape[1], k, index="flat")
    indptr, indices, weights = undirected(neighbours, sims)
    return [dict(zip(indices[indptr[i]:indptr[i + 1]].tolist(), weights[indptr[i]:indptr[i + 1]].tolist()))
            for i in range(len(dense))]


def traverse(graph):
    """The curriculum's traversal (:func:`traverse_csr`) of a graph of dicts, as paths."""
    indptr = np.concatenate([[0], np.cumsum([len(g) for g in graph])]).astype(np.int64)
    indices = np.array([j for g in graph for j in sorted(g)], np.int64)
    weights = np.array([g[j] for g in graph for j in sorted(g)], np.float64)
    order, is_start = traverse_csr(indptr, indices, weights)
    cuts = np.flatnonzero(is_start).tolist() + [len(order)]
    return [order[a:b].tolist() for a, b in zip(cuts, cuts[1:])]


def test_the_traversal_walks_to_the_most_similar_unvisited_neighbour():
    """Degrees: 0:1, 1:3, 2:2, 3:2, 4:1, 5:1.  Start at 0 (min degree, lowest index) -> 1 (only neighbour) ->
    3 (0.9 beats 2's 0.5) -> 2 -> no unvisited neighbour; next start 4 (degree 1) -> 5."""
    edges = {(0, 1): 0.8, (1, 2): 0.5, (1, 3): 0.9, (2, 3): 0.7, (4, 5): 0.3}
    graph = [dict() for _ in range(6)]
    for (a, b), w in edges.items():
        graph[a][b] = graph[b][a] = w
    assert traverse(graph) == [[0, 1, 3, 2], [4, 5]]


def test_every_document_is_in_exactly_one_chain_and_never_twice():
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(60)]
    texts = [" ".join(rng.choice(words, size=12)) for _ in range(300)]
    graph = knn_graph(document_features(texts, 2**12), 5)
    paths = traverse(graph)
    visited = [d for path in paths for d in path]
    assert sorted(visited) == list(range(300))
    # replay: every move went to a neighbour, the most similar one not visited before it
    seen: set[int] = set()
    for path in paths:
        seen.add(path[0])
        for a, b in zip(path, path[1:]):
            best = max(sim for j, sim in graph[a].items() if j not in seen)
            assert b in graph[a] and graph[a][b] == best
            seen.add(b)


def test_neighbours_are_documents_on_the_same_topic():
    texts = ["apples and bananas are fruit", "the banana is a yellow fruit", "fruit salad with apples",
             "python functions return values", "a python function with a return", "functions in python code"]
    graph = knn_graph(document_features(texts, 2**12), 1)
    for i in range(6):
        nearest = max(graph[i], key=graph[i].get)
        assert nearest // 3 == i // 3


def test_near_duplicates_of_the_previous_kept_document_are_dropped():
    texts = ["the quick brown fox jumps", "the quick brown fox jumps!", "completely different text here",
             "the quick brown fox jumps"]
    assert drop_near_duplicates([0, 1, 2, 3], texts, 0.85) == [0, 2, 3]  # 3 follows 2, not 0
    assert drop_near_duplicates([0, 1, 2, 3], texts, None) == [0, 1, 2, 3]


def test_documents_are_packed_in_chain_order_across_domains():
    docs = _documents([("a", "apples and bananas", "prose"), ("b", "def python(): return", "code"),
                       ("c", "bananas and apples", "prose"), ("d", "return python() def", "code")])
    from effitrain.config.blocks.curriculum_repacked import InContextParams

    settings = chain_settings(InContextParams(neighbors=1, n_features=2**10, dedup_threshold=None))
    chained = chained_rows(docs, ByteTokenizer(), 8, **settings)
    order = np.asarray(chained["order"]).tolist()
    assert sorted(order) == [0, 1, 2, 3] and {tuple(sorted(order[:2])), tuple(sorted(order[2:]))} == {(0, 2), (1, 3)}
    stream = [t for i in order for t in _bytes(docs[i]["text"]) + [EOS]]
    assert np.asarray(chained["rows"]).ravel().tolist() == stream[:len(stream) // 8 * 8]
    first_domain = docs[order[0]]["domain"]
    assert chained["domain"][0] == first_domain


def test_in_context_contexts_resume_to_the_same_batches():
    chained = {"rows": np.arange(64, dtype=np.int32).reshape(16, 4), "domain": np.array(["x"] * 16),
               "order": np.arange(16)}
    layout = {"seed": 3, "micro_batch_size": 2, "grad_accum": 2, "world_size": 1, "rank": 0}
    full = [b for b, _ in zip(iter(InContextSampler(chained, **layout)), range(20))]
    first = InContextSampler(chained, **layout)
    seen = [b for _, b in zip(range(7), iter(first))]  # range first: no batch taken past it
    resumed = InContextSampler(chained, **layout)
    resumed.load_state_dict(first.state_dict())
    seen += [b for b, _ in zip(iter(resumed), range(13))]
    assert seen == full and sorted(sum(full[:8], [])) == list(range(16))  # an epoch is every context once


# ============================================================================================== a real run
def _runs(flags):
    """The maximal runs of True in a 1-D bool list, as (start, end) pairs."""
    runs, start = [], None
    for i, f in enumerate(list(flags) + [False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _is_substring(part, whole):
    return any(whole[i:i + len(part)] == part for i in range(len(whole) - len(part) + 1))


@pytest.mark.slow
def test_a_meco_run_masks_metadata_until_the_cooldown_and_resumes_to_the_same_losses(tmp_path, train_in_process,
                                                                                    monkeypatch):
    """Six steps, cool-down from step 4.  A spy on the model's forward records the training batches: in the first
    four steps every label of -100 sits on metadata tokens (`URL: <domain>` and the blank line, cut only by a row
    boundary), every whole metadata sequence is masked, and there are some; in the cool-down none is left.  Three
    steps then `resume=auto` to six log the losses of the uninterrupted run."""
    import json

    import torch
    import transformers

    batches = []
    forward = transformers.LlamaForCausalLM.forward

    def spy(self, input_ids=None, labels=None, **kw):
        if torch.is_grad_enabled():  # training forwards (evaluation runs under no_grad)
            batches.append((input_ids.tolist(), labels.tolist()))
        return forward(self, input_ids=input_ids, labels=labels, **kw)

    monkeypatch.setattr(transformers.LlamaForCausalLM, "forward", spy)
    run = ["+recipe=meco", "scheduler=constant", "train.save_every=3",
           "timeline.phases={unit: step, intervals: {conditioning: [0, 4], cooldown: [4, 6]}}"]

    def losses(run_dir):
        return {l["step"]: l["loss"] for l in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                if "loss" in l}

    full, split = tmp_path / "full", tmp_path / "split"
    assert train_in_process([*run, "train.max_steps=6"], full)["finished"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(full / "tokenizer"))
    metadata = [tokenizer(f"URL: {d}\n\n", add_special_tokens=False)["input_ids"]
                for d in ("arithmetic", "code", "docstrings", "prose")]
    assert len(batches) == 6  # micro-batch 4, no accumulation: one forward per step
    masked_tokens = [0] * 6
    for step, (ids, labels) in enumerate(batches):
        for row, row_labels in zip(ids, labels):
            masked = [l == -100 for l in row_labels]
            assert [l for l, m in zip(row_labels, masked) if not m] == [t for t, m in zip(row, masked) if not m]
            for a, b in _runs(masked):
                assert any(_is_substring(row[a:b], m) for m in metadata)
                assert a == 0 or b == len(row) or any(row[a:b] == m for m in metadata)  # cut only at the ends
            for m in metadata:  # every whole metadata sequence is masked
                for i in range(len(row) - len(m) + 1):
                    if row[i:i + len(m)] == m:
                        assert all(masked[i:i + len(m)])
            masked_tokens[step] += sum(masked)
    assert all(n == 0 for n in masked_tokens[4:]) and sum(masked_tokens[:4]) > 0
    cooldown_ids = [t for ids, _ in batches[4:] for row in ids for t in row]
    assert not any(_is_substring(m, cooldown_ids) for m in metadata)  # plain rows carry no metadata

    assert train_in_process([*run, "train.max_steps=3"], split)["finished"]
    assert train_in_process([*run, "train.max_steps=6", "resume=auto"], split)["finished"]
    assert losses(split) == losses(full) and sorted(losses(full)) == [1, 2, 3, 4, 5, 6]
