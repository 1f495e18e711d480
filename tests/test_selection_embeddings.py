"""Selection over reference-model embeddings: RDS+ (pooling, round-robin), INGENIOUS (facility location), GOT-D
(optimal transport).  Mechanism tests on hand-made inputs, then each scorer once on the small fixture pool."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from test_selection import arith_doc, code_doc, make_pool, score

SMALL_PROXY = {"proxy_steps": 30, "max_length": 64, "batch_size": 32}


@pytest.fixture(scope="module")
def pool():
    return make_pool(n_per_domain=30)


# ------------------------------------------------------------------------------------------------ embeddings

def _tiny_byte_model():
    from types import SimpleNamespace

    from effitrain.selection.refmodel import byte_proxy
    params = SimpleNamespace(proxy_hidden_size=16, proxy_layers=1, max_length=32, device="cpu")
    model, encode = byte_proxy(params, seed=0)
    return model.eval(), encode


def test_position_weighted_pooling_by_hand_and_unaffected_by_padding():
    import torch

    from effitrain.selection.embeddings import embed
    model, encode = _tiny_byte_model()
    short, long = "ab", "a longer text"
    # alone: BOS + 2 bytes = 3 tokens, weights 1/6, 2/6, 3/6 on the last layer's hidden states
    ids, mask = encode([short])
    with torch.no_grad():
        hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1][0]
    by_hand = (1 * hs[0] + 2 * hs[1] + 3 * hs[2]) / 6
    mean_by_hand = hs.mean(0)
    # batched with a longer text, so the short one is right-padded: same vector
    got = embed(model, encode, [short, long], "cpu", -1, "position_weighted")
    np.testing.assert_allclose(got[0], by_hand.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(embed(model, encode, [short, long], "cpu", -1, "mean")[0], mean_by_hand.numpy(),
                               rtol=1e-4, atol=1e-5)
    assert not np.allclose(got[0], mean_by_hand.numpy(), atol=1e-4)  # the weighting is not the plain mean


# ------------------------------------------------------------------------------------------------ RDS+

def test_round_robin_alternates_tasks_and_a_repeat_wastes_the_turn():
    from effitrain.selection.scorers.rds import round_robin_order
    # task A ranks 0 > 1 > 2 > 3 > 4; task B ranks 0 > 3 > 4 > 2 > 1
    per_task = np.array([[0.9, 0.8],
                         [0.8, 0.1],
                         [0.7, 0.3],
                         [0.6, 0.7],
                         [0.5, 0.6]])
    # A:0, B:0 (taken: nothing), A:1, B:3, A:2, B:4, A:3 (taken), B:2 (taken), ..., so 0 1 3 2 4
    assert round_robin_order(per_task).tolist() == [0, 1, 3, 2, 4]
    # one task: plain best-first
    assert round_robin_order(per_task[:, :1]).tolist() == [0, 1, 2, 3, 4]


def test_rds_plus_task_score_is_the_max_over_a_tasks_examples():
    from effitrain.selection.scorers.rds import task_scores
    sims = np.array([[0.1, 0.9, 0.2], [0.5, 0.4, 0.8]])
    per_task, names = task_scores(sims, np.array(["a", "a", "b"]))
    assert names == ["a", "b"]
    np.testing.assert_allclose(per_task, [[0.9, 0.2], [0.5, 0.8]])


def test_rds_plus_takes_both_target_tasks_in_turn(pool, tmp_path):
    rng = random.Random(3)
    path = tmp_path / "tasks.jsonl"
    rows = [{"text": code_doc(rng), "kind": "code"} for _ in range(4)] + \
           [{"text": arith_doc(rng), "kind": "arith"} for _ in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    block = {"name": "rds_plus", "target": {"path": [str(path)], "task_field": "kind"}, "scorer": SMALL_PROXY}
    result, domains = score(block, pool)
    assert result.info["target_tasks"] == 2
    order = np.argsort(-result.scores)
    # the first picks alternate between the two tasks' nearest documents: both domains are near the top,
    # prose (no task) is not
    top = domains[order[:20]]
    assert (top == "code").sum() >= 6 and (top == "arithmetic").sum() >= 6, top
    assert (top == "prose").sum() <= 4, top
