"""The `seta` and `delt` curricula: SeTa's per-epoch selection (random pruning, k-means of the training losses, a
window sliding from easy to hard, annealing), the per-example loss tracker that feeds it, DELT's folding order, top-r
selection and learnability-quality score, and that both resume to the batches of an uninterrupted run."""

from __future__ import annotations

import json
from itertools import islice
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from effitrain.curriculum.folding import FixedOrderSampler, folding_order, top_ratio
from effitrain.curriculum.delt import delt_order
from effitrain.curriculum.seta import SetaSampler, keep_ratio, loss_groups, window
from effitrain.registry import ConfigError


# ------------------------------------------------------------------------------------------------- SeTa pieces
def test_keep_ratio_is_clamped_as_the_authors():
    assert keep_ratio(0.1) == pytest.approx(0.9) and keep_ratio(0.0) == 1.0 and keep_ratio(0.95) == 0.1


def test_the_window_takes_every_group_first_then_slides_from_easy_to_hard_and_starts_over():
    # 5 groups, window_scale 0.6: w = round(3) = 3 groups, 5 - 3 + 1 = 3 start positions
    assert [window(5, 0.6, e) for e in range(6)] == [(0, 5), (1, 4), (2, 5), (0, 3), (1, 4), (2, 5)]
    # the authors' defaults: 5 groups, 0.9 -> round(4.5) = 4 groups (Python rounds half to even), 2 positions
    assert [window(5, 0.9, e) for e in range(4)] == [(0, 5), (1, 5), (0, 4), (1, 5)]


def test_loss_groups_are_kmeans_clusters_sorted_easiest_first():
    rows = np.array([10, 11, 12, 13, 14, 15])
    losses = np.array([5.0, 0.1, 2.0, 0.2, 5.1, 2.1])
    groups = loss_groups(losses, rows, 3)
    assert [sorted(g.tolist()) for g in groups] == [[11, 13], [12, 15], [10, 14]]
    # equal losses (nothing trained yet): consecutive chunks, as the authors' torch.chunk
    assert [g.tolist() for g in loss_groups(np.ones(6), rows, 3)] == [[10, 11], [12, 13], [14, 15]]


def _seta(num_rows=40, *, prune_ratio=0.0, num_group=4, window_scale=0.5, anneal=1.0, max_steps=1000, micro=4,
          accum=1):
    return SetaSampler(num_rows, prune_ratio=prune_ratio, num_group=num_group, window_scale=window_scale,
                       anneal=anneal, initial_loss=3.0, max_steps=max_steps, seed=0, micro_batch_size=micro,
                       grad_accum=accum, world_size=1, rank=0)


def _train(sampler, n, loss_of, start=0):
    """Drive the sampler like the loop: next batch, then the objective's per-example losses reach the tracker."""
    import torch
    batches, it = [], iter(sampler)
    for t in range(start, start + n):
        rows = next(it)
        batch = {"example_losses": torch.tensor([float(loss_of(r, t)) for r in rows])}
        sampler.hook.on_after_forward(SimpleNamespace(batch=batch))
        batches.append(rows)
    return batches


def _epochs(sampler, batches, micro):
    """The set of rows of each epoch, split where the sampler's epochs ended (recorded lengths)."""
    out, i = [], 0
    for n in sampler._lengths:
        out.append(sorted(r for b in batches[i:i + n // micro] for r in b))
        i += n // micro
    return out


def test_each_epoch_trains_the_window_of_loss_groups_the_schedule_gives():
    """40 rows whose loss is row // 10: four exact loss groups {0-9} < {10-19} < {20-29} < {30-39}.  Window of 2
    groups, 3 start positions: epoch 0 all rows, then groups 1-2, 2-3, 0-1, 1-2."""
    s = _seta()
    lengths = []
    original = s.select

    def spy(*a):
        order = original(*a)
        lengths.append(len(order))
        return order
    s.select, s._lengths = spy, lengths
    batches = _train(s, 10 + 5 + 5 + 5 + 5, lambda r, t: r // 10)
    epochs = _epochs(s, batches, 4)
    assert epochs[0] == list(range(40))
    assert epochs[1] == list(range(10, 30)) and epochs[2] == list(range(20, 40))
    assert epochs[3] == list(range(0, 20)) and epochs[4] == list(range(10, 30))
    assert s.info["group_sizes"] == [10, 10, 10, 10]


def test_random_pruning_keeps_the_seeded_share_and_annealing_drops_the_window():
    # prune_ratio 0.5: epoch 0 trains exactly the first 20 of the (seed, epoch 0) permutation
    s = _seta(prune_ratio=0.5)
    first = sorted(r for b in _train(s, 5, lambda r, t: r // 10) for r in b)
    assert first == sorted(np.random.default_rng([0, 0]).permutation(40)[:20].tolist())
    # anneal 0.5 of 20 steps: epoch 0 (10 steps) uses the window schedule, epoch 1 starts at step 10 >= 10 and is a
    # plain random share: all 40 rows at keep ratio 1, where the window would have kept 20
    s = _seta(anneal=0.5, max_steps=20)
    _train(s, 11, lambda r, t: r // 10)
    assert s.info == {"epoch": 1, "annealing": True, "rows": 40}


def test_a_window_smaller_than_a_global_batch_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"^curriculum.window_scale: a SeTa window keeps about 2 of the 10 packed"):
        _seta(num_rows=10, num_group=5, window_scale=0.2, micro=4)


@pytest.mark.parametrize("stop_after", [3, 10, 14])  # inside epoch 0, at its end, inside epoch 1
def test_seta_state_round_trip_continues_with_the_same_batches(stop_after):
    loss = lambda r, t: ((r * 7 + t) % 11) / 3.0  # noqa: E731  (changes with time: the window sees new losses)
    full = _train(_seta(num_group=3, window_scale=0.7), 30, loss)
    first = _seta(num_group=3, window_scale=0.7)
    seen = _train(first, stop_after, loss)
    sampler_state, tracker_state = first.state_dict(), first.hook.state_dict()
    resumed = _seta(num_group=3, window_scale=0.7)
    resumed.load_state_dict(sampler_state)
    resumed.hook.load_state_dict(tracker_state)
    seen += _train(resumed, 30 - stop_after, loss, start=stop_after)
    assert seen == full


def test_the_tracker_refuses_an_objective_without_per_example_losses():
    from effitrain.errors import RunFailed
    s = _seta()
    next(iter(s))
    with pytest.raises(RunFailed, match="use objective=weighted_causal_lm"):
        s.hook.on_after_forward(SimpleNamespace(batch={"input_ids": None}))


def test_weighted_objective_publishes_each_examples_loss():
    import torch

    from effitrain.objectives.weighted import WeightedCausalLM, example_losses

    logits = torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    model = lambda **kw: SimpleNamespace(logits=logits)  # noqa: E731
    batch = {"input_ids": labels, "labels": labels}
    loss, _ = WeightedCausalLM(1.0)(model, batch, None)
    assert torch.equal(batch["example_losses"], example_losses(logits, labels))
    assert torch.allclose(loss, batch["example_losses"].mean())


def test_seta_with_the_models_own_loss_is_refused_before_anything_is_built(tmp_path):
    from conftest import effitrain_cli
    out = effitrain_cli("check", "+recipe=seta", "objective=causal_lm")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "[seta_needs_example_losses]" in out.stderr and len(out.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------------- DELT pieces
def test_folding_sorts_by_score_then_deals_the_rows_into_folds():
    scores = np.array([5, 1, 4, 2, 3, 0, 6])
    # ascending: rows 5,1,3,4,2,0,6; 3 folds take sorted positions {0,3,6}, {1,4}, {2,5}
    assert folding_order(scores, 3).tolist() == [5, 4, 6, 1, 2, 3, 0]
    assert folding_order(scores, 1).tolist() == [5, 1, 3, 4, 2, 0, 6]  # one fold = sorting


def test_every_fold_ascends_and_no_row_repeats():
    scores = np.random.default_rng(1).normal(size=300)
    order = folding_order(scores, 4)
    assert sorted(order.tolist()) == list(range(300))
    for fold in np.array_split(order, 4):  # 300 / 4: equal folds
        assert np.all(np.diff(scores[fold]) >= 0)


def test_top_r_keeps_the_highest_scores_and_delt_orders_only_those():
    scores = np.array([0.3, -1.0, 2.0, 0.0, 1.0, -0.5])
    assert top_ratio(scores, 0.5).tolist() == [0, 2, 4] and top_ratio(scores, 1.0).tolist() == list(range(6))
    assert delt_order(scores, select_ratio=0.5, ordering="sorting", layers=3, seed=0).tolist() == [0, 4, 2]
    assert delt_order(scores, select_ratio=1.0, ordering="folding", layers=2, seed=0).tolist() == [1, 3, 4, 5, 0, 2]
    shuffled = delt_order(scores, select_ratio=1.0, ordering="shuffle", layers=2, seed=0)
    assert sorted(shuffled.tolist()) == list(range(6))


def test_fixed_order_sampler_resumes_the_same_batches_and_refuses_another_order():
    order = folding_order(np.random.default_rng(2).normal(size=50), 3)
    layout = dict(seed=0, micro_batch_size=4, grad_accum=2, world_size=1, rank=0)
    full = list(islice(FixedOrderSampler(order, 50, **layout), 20))
    assert [r for b in full[:12] for r in b] == order[:48].tolist()  # 6 steps of 8 rows: one epoch, tail dropped
    first = FixedOrderSampler(order, 50, **layout)
    seen = list(islice(first, 7))  # stops inside an optimizer step
    resumed = FixedOrderSampler(order, 50, **layout)
    resumed.load_state_dict(first.state_dict())
    assert seen + list(islice(resumed, 13)) == full
    with pytest.raises(ConfigError, match="^resume: the checkpoint's row order differs"):
        FixedOrderSampler(order[::-1], 50, **layout).load_state_dict(first.state_dict())


def test_lqs_standardises_as_the_authors_and_spaces_its_states():
    from effitrain.curriculum.lqs import ct_states, standardise
    z = standardise(np.array([1.0, 2.0, 3.0, 4.0]))
    assert np.allclose(z, (np.array([1, 2, 3, 4]) - 2.5) / np.std([1, 2, 3, 4]))
    assert np.all(standardise(np.array([0.0] * 99 + [1000.0])) <= 3.0) and standardise(np.ones(3)).tolist() == [0] * 3
    assert ct_states(100, 10) == [0, 10, 20, 30, 40, 50, 60, 70, 80, 90]  # compute_ct_interval 10 of 100 steps


def test_lqs_ranks_rows_like_the_target_above_unrelated_rows():
    """Quality is the alignment of a row's gradient with the target's: rows drawn from the target's token
    distribution score above rows of disjoint tokens."""
    from effitrain.curriculum.lqs import lqs_scores
    rng = np.random.default_rng(0)
    like = rng.integers(0, 8, (12, 12))        # the target's "domain": tokens 0-7
    other = rng.integers(8, 16, (12, 12))      # another: tokens 8-15
    ids = np.concatenate([like, other])
    target = rng.integers(0, 8, (6, 12))
    score, info = lqs_scores(ids, target, proxy_steps=6, states=3, batch_size=4, lr=1e-2, hidden=16, layers=1, seed=0)
    assert info["ct_states"] == [0, 2, 4]
    assert score[:12].mean() > score[12:].mean() + 0.3
    assert (score[:12] > np.median(score[12:])).sum() >= 8


def test_lqs_lambda_holds_the_authors_count_of_target_gradients_and_ct_is_the_learnability_ratio(monkeypatch):
    """By hand, with crafted gradients: 20 proxy steps, states 0, 5, 10, 15 (interval 5), final state 20.  The
    authors' lambda at state s sums the target gradients of states s+1 .. 20; each recorded one stands for the
    5 steps ending at it, so lambda(15) = 5 g20, lambda(10) = 5 g20 + 5 g15, ...  A row's contribution at s is
    |lambda| x (|g_n(s)| / |g_n(later)|) x cos(g_n(s), lambda), the later norm 1 at the first state scored."""
    from effitrain.curriculum import lqs

    dev = {0: [1.0, 0.0], 5: [0.0, 2.0], 10: [1.0, 1.0], 15: [3.0, 0.0], 20: [0.0, 1.0]}
    rows = {15: [[1.0, 0.0], [0.0, 1.0]], 10: [[2.0, 0.0], [0.0, 3.0]],     # row 0 grows, row 1 grows faster
            5: [[2.0, 2.0], [0.0, -1.0]], 0: [[4.0, 0.0], [1.0, 1.0]]}
    dev_calls, row_calls = [], []

    def fake_dev_gradient(model, ids):      # called at the recorded states and the final one, in training order
        step = sorted(dev)[len(dev_calls)]
        dev_calls.append(step)
        return torch.tensor(dev[step], dtype=torch.float64)

    def fake_row_gradients(model, rows_ids):   # called at the recorded states, latest first
        step = sorted(rows, reverse=True)[len(row_calls)]
        row_calls.append(step)
        yield 0, torch.tensor(rows[step], dtype=torch.float64)

    monkeypatch.setattr(lqs, "_flat_grad", fake_dev_gradient)
    monkeypatch.setattr(lqs, "row_gradients", fake_row_gradients)
    ids = np.random.default_rng(0).integers(0, 8, (2, 6))
    score, info = lqs.lqs_scores(ids, ids, proxy_steps=20, states=4, batch_size=2, lr=1e-2, hidden=32, layers=1,
                                 seed=0)
    assert info["ct_states"] == [0, 5, 10, 15] and dev_calls == [0, 5, 10, 15, 20] and row_calls == [15, 10, 5, 0]

    g = {s: np.array(v) for s, v in dev.items()}
    lam = {15: 5 * g[20], 10: 5 * g[20] + 5 * g[15], 5: 5 * g[20] + 5 * g[15] + 5 * g[10],
           0: 5 * g[20] + 5 * g[15] + 5 * g[10] + 5 * g[5]}
    for n in (0, 1):
        expected, later = 0.0, 1.0
        for s in (15, 10, 5, 0):
            mine = np.array(rows[s][n])
            learnability = np.linalg.norm(mine) / later
            cos = mine @ lam[s] / (np.linalg.norm(mine) * np.linalg.norm(lam[s]))
            expected += np.linalg.norm(lam[s]) * learnability * cos
            later = np.linalg.norm(mine)
        assert score[n] == pytest.approx(expected)
    # an uneven spacing: the final state stands for the 10 steps after the last recorded one, 90 for 30
    assert lqs.adjoint_weights([15, 10, 5, 0], 20) == {20: 5, 15: 5, 10: 5, 5: 5}
    assert lqs.adjoint_weights([90, 60], 100) == {100: 10, 90: 30}


def test_the_cached_scores_are_reused_and_scorer_fills_unannotated_rows(tmp_path):
    from effitrain.config.blocks.curriculum_prune import DeltParams
    from effitrain.curriculum.lqs import cached_lqs
    rng = np.random.default_rng(0)
    ids = np.concatenate([rng.integers(0, 8, (16, 12)), rng.integers(8, 16, (16, 12))])
    domains = (np.array([0] * 16 + [1] * 16), np.array(["a", "b"]))
    params = DeltParams(target_domain="a", target_rows=6, annotate_rows=12, proxy_steps=6, ct_states=3,
                        proxy_batch_size=4, proxy_lr=1e-2, proxy_hidden_size=16, proxy_layers=1)
    scores, info = cached_lqs(ids, domains, params, seed=0, cache=str(tmp_path))
    assert not info["cache_hit"] and scores.shape == (32,) and "scorer_fit_corr" in info
    again, info2 = cached_lqs(ids, domains, params, seed=0, cache=str(tmp_path))
    assert info2["cache_hit"] and np.array_equal(scores, again)
    with pytest.raises(ConfigError, match="^curriculum.target_domain: 'c' has no packed training rows"):
        cached_lqs(ids, domains, DeltParams(target_domain="c"), seed=0, cache=str(tmp_path))


# ------------------------------------------------------------------------------------------------- a real run
@pytest.mark.slow
def test_a_resumed_seta_run_logs_the_losses_of_the_uninterrupted_one(tmp_path, train_in_process, monkeypatch):
    """Eight steps vs four then `resume=auto`, on a corpus small enough that SeTa's epochs are a few steps long, so
    the window moves inside the run and the resumed part starts a new epoch from the checkpointed losses."""
    from effitrain.curriculum import seta

    epochs = []
    select = seta.SetaSampler.select

    def spy(self, epoch, start_step, losses):
        order = select(self, epoch, start_step, losses)
        epochs.append((epoch, start_step, self.info.get("window")))
        return order

    monkeypatch.setattr(seta.SetaSampler, "select", spy)
    run = ["+recipe=seta", "scheduler=constant", "train.save_every=4", "train.micro_batch_size=64",
           "dataset.max_docs_per_domain=12", "curriculum.num_group=3", "curriculum.window_scale=0.67"]

    def losses(run_dir):
        return {l["step"]: l["loss"] for l in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                if "loss" in l}

    full, split = tmp_path / "full", tmp_path / "split"
    assert train_in_process([*run, "train.max_steps=8"], full)["finished"]
    uninterrupted, epochs[:] = list(epochs), []
    assert len(uninterrupted) >= 3 and uninterrupted[1][2] == [1, 3]   # epoch 1 drops the easiest of 3 groups
    assert train_in_process([*run, "train.max_steps=4"], split)["finished"]
    assert train_in_process([*run, "train.max_steps=8", "resume=auto"], split)["finished"]
    assert [e for e in epochs if e[1] >= 4] == [e for e in uninterrupted if e[1] >= 4] != []
    assert losses(split) == losses(full) and sorted(losses(full)) == list(range(1, 9))


def test_the_delt_sampler_hands_out_the_top_rows_in_folding_order_of_their_scores(tmp_path, monkeypatch):
    import datasets

    from effitrain.config.blocks.curriculum_prune import DeltParams
    from effitrain.curriculum.delt import build_delt

    monkeypatch.setenv("EFFITRAIN_CACHE", str(tmp_path))
    rng = np.random.default_rng(3)
    ids = np.concatenate([rng.integers(0, 8, (10, 12)), rng.integers(8, 16, (10, 12))]).astype(np.int32)
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"), length=12),
                                  "domain": datasets.Value("string")})   # fixed-length rows, as packing writes
    packed = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "domain": ["a"] * 10 + ["b"] * 10}, features)
    params = DeltParams(select_ratio=0.8, layers=2, target_domain="a", target_rows=4, proxy_steps=4, ct_states=2,
                        proxy_batch_size=4, proxy_lr=1e-2, proxy_hidden_size=16, proxy_layers=1)
    sampler = build_delt(params, packed, seed=0, micro_batch_size=2, grad_accum=1, world_size=1, rank=0)
    rows = [r for b in islice(sampler, 8) for r in b]
    kept = np.argsort(sampler.scores, kind="stable")[4:]          # the 16 highest of 20 scores
    ascending = kept[np.argsort(sampler.scores[kept], kind="stable")]
    assert rows == ascending[0::2].tolist() + ascending[1::2].tolist()  # two folds, each low to high
