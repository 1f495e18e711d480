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
    # last: the state of the last real token, not of the padding after it
    np.testing.assert_allclose(embed(model, encode, [short, long], "cpu", -1, "last")[0], hs[2].numpy(),
                               rtol=1e-4, atol=1e-5)


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


# ------------------------------------------------------------------------------------------------ INGENIOUS

def _naive_greedy(sim, k):
    """Plain greedy: every step evaluates every remaining element's gain."""
    from effitrain.selection.scorers.submodular import facility_location_value
    chosen = []
    for _ in range(k):
        rest = [j for j in range(len(sim)) if j not in chosen]
        base = facility_location_value(sim, chosen)
        gains = [facility_location_value(sim, chosen + [j]) - base for j in rest]
        chosen.append(rest[int(np.argmax(gains))])
    return chosen


def test_facility_location_greedy_finds_one_per_cluster_the_exhaustive_optimum():
    import itertools

    from effitrain.selection.scorers.submodular import facility_location_value, lazy_greedy
    # three clusters {0, 1, 2, 3}, {4, 5, 6}, {7, 8, 9} with centres 1, 4, 8; across clusters similarity 0.1
    within = {0: 0.9, 1: 0.9, 2: 0.5}
    groups = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    sim = np.array([[within[gi] if gi == gj else 0.1 for gj in groups] for gi in groups])
    for centre, members, s in ((1, range(0, 4), 0.95), (4, range(4, 7), 0.95), (8, range(7, 10), 0.6)):
        for m in members:
            sim[centre, m] = sim[m, centre] = s
    np.fill_diagonal(sim, 1.0)
    order, gains = lazy_greedy(sim)
    # by hand: 1 covers its cluster (0.95 + 1 + 0.95 + 0.95 + 6 x 0.1 = 4.45); then 4 lifts its cluster from 0.1
    # (0.85 + 0.9 + 0.85 = 2.6); then 8 (0.5 + 0.9 + 0.5 = 1.9, ahead of 7's 0.9 + 0.5 + 0.4)
    assert order[:3].tolist() == [1, 4, 8]
    np.testing.assert_allclose(gains[:3], [4.45, 2.6, 1.9])
    best = max(itertools.combinations(range(10), 3), key=lambda s: facility_location_value(sim, s))
    assert sorted(best) == [1, 4, 8]


def test_lazy_greedy_equals_plain_greedy_and_its_gains_never_grow():
    from effitrain.selection.scorers.submodular import facility_location_value, lazy_greedy
    rng = np.random.default_rng(0)
    x = rng.normal(size=(14, 5))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sim = x @ x.T                                   # cosines, some negative
    order, gains = lazy_greedy(sim)
    assert sorted(order.tolist()) == list(range(14))
    assert order[:8].tolist() == _naive_greedy(sim, 8)
    # the objective along the greedy order is monotone; its increments are the reported gains and shrink
    values = [facility_location_value(sim, order[:k]) for k in range(15)]
    assert all(b >= a - 1e-12 for a, b in zip(values, values[1:]))
    np.testing.assert_allclose(np.diff(values), gains, atol=1e-9)
    assert all(b <= a + 1e-12 for a, b in zip(gains, gains[1:]))


def test_partitioned_greedy_gives_every_partition_its_share_of_the_budget():
    from effitrain.selection.scorers.submodular import partitioned_greedy, random_partitions
    from effitrain.selection.selectors import TopKSelector
    from types import SimpleNamespace
    rng = np.random.default_rng(1)
    x = rng.normal(size=(100, 4))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    parts = random_partitions(100, 30, rng)
    assert [len(p) for p in parts] == [25, 25, 25, 25]
    uneven = [np.arange(0, 50), np.arange(50, 80), np.arange(80, 100)]
    share, gain, label = partitioned_greedy(x, uneven)
    chosen = TopKSelector(SimpleNamespace(descending=True)).select(-share, None, np.ones(100), 20, rng)
    counts = np.bincount(label[chosen], minlength=3)
    assert counts.tolist() == [10, 6, 4]            # 20 % of 50, 30 and 20
    # within a partition the picks are that partition's greedy prefix
    from effitrain.selection.scorers.submodular import lazy_greedy
    sim = x[50:80] @ x[50:80].T
    assert set(chosen[label[chosen] == 1].tolist()) == set((50 + lazy_greedy(sim, 6)[0]).tolist())


def test_taylor_softmax_by_hand():
    from effitrain.selection.scorers.submodular import taylor_softmax
    np.testing.assert_allclose(taylor_softmax(np.array([0.0, 1.0, 2.0])), np.array([1.0, 2.5, 5.0]) / 8.5)


def test_sampling_draws_each_greedy_pick_with_its_taylor_softmax_probability():
    from effitrain.selection.scorers.submodular import sampled_order
    order, gains = np.array([10, 11, 12]), np.array([2.0, 1.0, 0.0])
    rng = np.random.default_rng(0)
    draws = np.array([sampled_order(order, gains, 1.0, rng) for _ in range(20000)])
    first = np.array([(draws[:, 0] == j).mean() for j in order])
    np.testing.assert_allclose(first, np.array([5.0, 2.5, 1.0]) / 8.5, atol=0.015)
    # without replacement: the second draw renormalizes over what is left (after 10: 2.5 / 3.5 for 11)
    after_10 = draws[draws[:, 0] == 10]
    assert (after_10[:, 1] == 11).mean() == pytest.approx(2.5 / 3.5, abs=0.02)
    # temperature flattens: at T = 100 the three are nearly equally likely
    flat = np.array([sampled_order(order, gains, 100.0, rng)[0] for _ in range(6000)])
    assert all(abs((flat == j).mean() - 1 / 3) < 0.03 for j in order)


def test_ingenious_selection_covers_the_pool_better_than_random(pool, monkeypatch):
    from effitrain.selection.scorers import submodular
    from effitrain.selection.scorers.submodular import facility_location_value
    seen = {}
    real = submodular.partitioned_greedy

    def keep(x, parts, *args):
        seen["x"] = x
        return real(x, parts, *args)
    monkeypatch.setattr(submodular, "partitioned_greedy", keep)
    block = {"name": "ingenious", "budget": {"fraction": 0.1, "unit": "examples"},
             "scorer": {**SMALL_PROXY, "partition_size": 1000, "sampling": "greedy"}}
    result, domains = score(block, pool)
    assert result.info["partitions"] == 1
    # coverage of the pool (in the scorer's own embeddings) by the top k, against random sets of k
    k = 9
    chosen = np.argsort(-result.scores, kind="stable")[:k]
    x = seen["x"]
    sim = x @ x.T
    rng = np.random.default_rng(0)
    random_values = [facility_location_value(sim, rng.choice(len(x), k, replace=False)) for _ in range(20)]
    assert facility_location_value(sim, chosen) > max(random_values)
    assert len(set(domains[chosen])) == 3          # a representative subset spans the pool's three domains


# ------------------------------------------------------------------------------------------------ GOT-D

def test_got_d_gradient_on_a_line_is_the_analytic_one():
    from effitrain.selection.scorers.got_d import calibrated_gradient, ot_potentials
    # candidates on a line, all mass of the target at t = 0.3: the plan is forced (every candidate sends its mass
    # to t), OT = sum_i a_i (x_i - t)^2, so d OT / d a_i = (x_i - t)^2 up to the constant the masses fix
    x = np.array([[-1.0], [0.0], [0.25], [0.5], [2.0]])
    f, info = ot_potentials(x, np.array([[0.3]]), epsilon=0.05)
    cost = (x[:, 0] - 0.3) ** 2
    np.testing.assert_allclose(f - f.mean(), cost - cost.mean(), atol=1e-6)
    grad = calibrated_gradient(f)
    assert np.argsort(grad).tolist() == [2, 3, 1, 0, 4]        # nearest to t first: the most negative gradients
    np.testing.assert_allclose(grad, f - f.mean() + f / len(f))


def test_got_d_potential_is_the_derivative_of_the_ot_distance():
    import ot

    from effitrain.selection.scorers.got_d import ot_potentials
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 1)), rng.normal(1.0, 0.5, size=(4, 1))
    eps = 0.2
    f, _ = ot_potentials(x, y, eps)

    def entropic_ot(a):   # primal value of the entropic problem POT solves: <P, C> - eps H(P)
        P = ot.sinkhorn(a, np.full(4, 0.25), ot.dist(x, y), eps, method="sinkhorn_log", stopThr=1e-12,
                        numItermax=20000)
        return float((P * ot.dist(x, y)).sum() + eps * (P * (np.log(P + 1e-300) - 1)).sum())

    a = np.full(12, 1 / 12)
    h = 1e-5
    for i in (0, 5, 11):   # move mass h to candidate i from all (the direction that keeps the total at 1)
        d = -np.full(12, h / 12)
        d[i] += h
        numeric = (entropic_ot(a + d) - entropic_ot(a - d)) / (2 * h)
        assert numeric == pytest.approx(f[i] - f.mean(), abs=2e-4)


def test_got_d_selection_moves_the_pool_toward_the_target():
    from types import SimpleNamespace

    from effitrain.selection.scorers.got_d import calibrated_gradient, ot_potentials
    from effitrain.selection.selectors import TopKSelector
    rng = np.random.default_rng(2)
    pool = np.concatenate([rng.normal(0.0, 1.0, size=(300, 2)), rng.normal([4.0, 0.0], 1.0, size=(100, 2))])
    target = rng.normal([3.0, 0.0], 0.5, size=(30, 2))
    f, _ = ot_potentials(pool, target, 0.5)
    chosen = TopKSelector(SimpleNamespace(descending=True)).select(-calibrated_gradient(f), None, np.ones(400), 80,
                                                                   rng)
    # the pool's mean is ~2 away from the target's; the selection's less than a third of that
    assert abs(pool[chosen, 0].mean() - 3.0) < abs(pool[:, 0].mean() - 3.0) / 3
    assert ot_distance(pool[chosen], target) < ot_distance(pool, target)


def ot_distance(x, y):
    import ot
    return float(ot.emd2(np.full(len(x), 1 / len(x)), np.full(len(y), 1 / len(y)), ot.dist(x, y)))


def test_got_d_target_like_outranks_unrelated(pool):
    from test_selection import TARGET_CODE, assert_target_outranks
    result, domains = score({"name": "got_d", "target": TARGET_CODE, "scorer": SMALL_PROXY}, pool)
    assert_target_outranks(result.scores, domains)
    assert result.info["sinkhorn_error"] < 1e-5
