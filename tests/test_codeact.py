"""CodeACT (effitrain/selection/scorers/ifd.py, the cluster_proportional selector, Dynamic Pack in
effitrain/data/chat.py): IFD is the perplexity ratio the authors compute, each cluster gives its top-IFD share, and
dynamic packing needs no more rows than first-fit and never splits a conversation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from effitrain.config.blocks import load_builtin_blocks
from effitrain.registry import REGISTRY

load_builtin_blocks()


def _tiny_byte_model(seed=0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def test_ifd_is_the_answers_perplexity_after_the_prompt_over_alone_by_hand():
    import torch

    from effitrain.selection.refmodel import BOS, ByteEncoder
    from effitrain.selection.scorers.ifd import answer_losses, ifd

    model = _tiny_byte_model()
    question, answer = "What is 37+45?", "82, because 37 + 45 = 82"
    cond, alone = answer_losses(model, ByteEncoder(256), [question], [answer], "cpu", 256)

    def by_hand(context: bytes, target: bytes) -> float:
        ids = torch.tensor([[BOS, *context, *target]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        first = 1 + len(context)  # position of the first answer token
        picks = [float(logp[t - 1, ids[0, t]]) for t in range(max(first, 1), ids.shape[1])]
        return -sum(picks) / len(picks)

    prompt = f"Question:\n{question}\n\nAnswer:\n".encode()
    hand_cond, hand_alone = by_hand(prompt, answer.encode()), by_hand(b"", answer.encode())
    assert cond[0] == pytest.approx(hand_cond, rel=1e-5) and alone[0] == pytest.approx(hand_alone, rel=1e-5)
    assert ifd(cond, alone, "perplexity")[0] == pytest.approx(math.exp(hand_cond) / math.exp(hand_alone), rel=1e-5)
    assert ifd(cond, alone, "loss")[0] == pytest.approx(hand_cond / hand_alone, rel=1e-5)
    assert ifd(np.array([np.nan]), np.array([1.0]), "perplexity")[0] == 0.0  # the authors' fallback


def test_every_cluster_gives_its_top_scores_in_proportion_to_its_size():
    from effitrain.selection.selectors import ClusterProportionalSelector

    rng = np.random.default_rng(0)
    clusters = np.repeat([0, 1, 2], [50, 30, 20])
    scores = rng.random(100)
    chosen = ClusterProportionalSelector(None).select(scores, clusters, np.ones(100), 40.0, rng)
    for c, share in [(0, 20), (1, 12), (2, 8)]:
        mine = np.flatnonzero(clusters == c)
        top = mine[np.argsort(-scores[mine])[:share]]
        assert sorted(np.intersect1d(chosen, mine).tolist()) == sorted(top.tolist())
    # a share is rounded down, as the authors' int(len(cluster) * ratio)
    assert len(ClusterProportionalSelector(None).select(scores, clusters, np.ones(100), 45.0, rng)) == 22 + 13 + 9


def _first_fit_rows(lengths, capacity):
    room = []
    for n in lengths:
        for i, r in enumerate(room):
            if r >= n:
                room[i] -= n
                break
        else:
            room.append(capacity - n)
    return len(room)


@pytest.mark.parametrize("seed", range(5))
def test_dynamic_packing_needs_no_more_rows_than_first_fit_and_splits_nothing(seed):
    from effitrain.data.chat import pack_conversations

    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 90, size=300).tolist()
    # conversation i: tokens 1000*i + position; labels on every token but the first
    encoded = [([1000 * i + k for k in range(n)], [-100] + [1000 * i + k for k in range(1, n)])
               for i, n in enumerate(lengths)]
    dynamic = pack_conversations(encoded, 128, 0, packing="dynamic")
    in_order = pack_conversations(encoded, 128, 0)
    assert len(dynamic.rows) <= _first_fit_rows(lengths, 128) <= len(in_order.rows)
    assert len(dynamic.rows) < len(in_order.rows)
    # every conversation lies whole in one row, its positions counting from 0
    seen = {}
    for r, row in enumerate(dynamic.rows):
        ids, labels, pos = row
        for start in np.flatnonzero(pos == 0):
            i = int(ids[start]) // 1000
            if labels[start] == -100 and ids[start] == 0 and (labels[start:] == -100).all():
                continue  # the row's padding
            n = lengths[i]
            assert (ids[start:start + n] == 1000 * i + np.arange(n)).all() and (pos[start:start + n] == np.arange(n)).all()
            assert i not in seen
            seen[i] = r
    assert sorted(seen) == list(range(len(lengths)))


def _chat_pool(n=60):
    import datasets

    from effitrain.data.chat_sources import render_text

    rng = np.random.default_rng(1)
    rows = []
    for i in range(n):
        a, b = int(rng.integers(10, 99)), int(rng.integers(10, 99))
        messages = [{"role": "user", "content": f"What is {a}+{b}?"}, {"role": "assistant", "content": str(a + b)}]
        rows.append({"id": f"c{i}", "text": render_text(messages), "domain": "arith",
                     "messages": json.dumps(messages), "rejected": ""})
    train = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict({"train": train, "eval": train.select(range(4))})


def test_the_codeact_selection_keeps_the_top_ifd_share_of_each_cluster_below_1(tmp_path):
    from pathlib import Path

    block = REGISTRY.parse("selection", {
        "name": "codeact", "budget": {"fraction": 0.4, "unit": "examples"},
        "scorer": {"proxy_steps": 3, "num_clusters": 3, "batch_size": 32}}, "selection")
    selection = block.build(_chat_pool(), cache_dir=str(tmp_path), seed=0)
    assert "messages" in selection.train.column_names  # the rows are built from the conversations afterwards
    info = selection.info
    assert info["scorer_clusters"] == 3
    # IFD >= 1 is dropped before the selector; the selector keeps at most the budget (shares rounded down)
    assert info["after_filter_examples"] == info["scorer_ifd_below_max"]
    assert 0 < info["kept_examples"] <= min(24, info["after_filter_examples"])
    selected = [json.loads(line) for line in
                (Path(selection.manifest_path).parent / "selected.jsonl").read_text().splitlines()]
    assert len(selected) == info["kept_examples"] and all(0 < r["score"] < 1 for r in selected)


def test_dynamic_packing_of_pairs_or_prompts_is_refused_at_check():
    from effitrain.config.compose import compose_config
    from effitrain.config.spec import validate
    from effitrain.registry import ConfigError

    with pytest.raises(ConfigError, match=r"^dataset\.packing: 'dynamic' packs training conversations \(format=chat\)"):
        validate(compose_config(["+recipe=codeact", "dataset.format=preference"]).cfg)
    with pytest.raises(ConfigError, match=r"^dataset\.packing"):
        validate(compose_config(["dataset=chat_local", "dataset.path=x.jsonl", "dataset.format=prompts",
                                 "dataset.packing=dynamic"]).cfg)
