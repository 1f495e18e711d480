"""curriculum=difficulty and curriculum=scored_order: pacing functions, the timeline's competence, which rows each
step may draw, MacAvaney-style weights, and resuming to the same batches (unit tests on the samplers; the real run
with a proxy scorer is in test_quality_curriculum_avg.py)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from effitrain.curriculum.difficulty import DifficultyWeights, PacedDifficultySampler, WeightedDifficultySampler
from effitrain.curriculum.pacing import breakpoints, competence
from effitrain.curriculum.row_scores import domain_order_scores, rank_difficulty
from effitrain.curriculum.scored_order import ScoredOrderSampler
from effitrain.registry import ConfigError
from effitrain.timeline import parse_timeline

LAYOUT = dict(seed=3, micro_batch_size=2, grad_accum=2, world_size=1, rank=0)  # 4 rows per optimizer step


def timeline(pacing: dict, max_steps: int = 100):
    return parse_timeline({"competence": {"pacing": pacing}}).resolve(max_steps=max_steps, tokens_per_step=64)


def test_pacing_functions_match_their_formulas():
    # Platanios et al. 2019, eq. 6 and 7 (p = 2), c0 = 0.1, half-way through the pacing
    assert competence("linear", 0.5, start=0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert competence("root", 0.5, start=0.1) == pytest.approx(math.sqrt(0.01 + 0.99 * 0.5))
    # Hacohen & Weinshall's fixed exponential pacing: 0.1 doubled every 10% of the pacing -> two jumps by t = 0.25
    assert competence("step", 0.25, start=0.1, increase=2, step_length=0.1) == pytest.approx(0.4)
    for f in ("linear", "root", "step"):
        assert competence(f, 0.0, start=0.1) == pytest.approx(0.1) and competence(f, 1.0, start=0.1) == 1.0


def test_the_timeline_holds_the_pacing_in_steps():
    # linear from 0.2 to 1 over the first half of 100 steps: step 25 is half-way
    lin = timeline({"function": "linear", "start": 0.2, "until": 0.5})
    assert lin.value("competence", 0) == pytest.approx(0.2)
    assert lin.value("competence", 25) == pytest.approx(0.6)
    assert lin.value("competence", 50) == 1.0 and lin.value("competence", 99) == 1.0
    # step pacing: 0.1, 0.2 from step 5, 0.4 from step 10, 0.8 from step 15, all rows from step 20 (held, not drawn)
    st = timeline({"function": "step", "start": 0.1, "until": 0.5, "increase": 2, "step_length": 0.1})
    assert [st.value("competence", s) for s in (0, 4, 5, 9, 10, 15, 19, 20)] == [0.1, 0.1, 0.2, 0.2, 0.4, 0.8, 0.8,
                                                                                  1.0]
    # root: the chord approximation stays within 1% of the formula at every step
    rt = timeline({"function": "root", "start": 0.01, "until": 1.0}, max_steps=1000)
    worst = max(abs(rt.value("competence", s) - competence("root", s / 1000, start=0.01)) for s in range(1000))
    assert worst < 0.01
    assert breakpoints("linear", start=0.3, until=0.4) == [(0.0, 0.3), (0.4, 1.0)]


def test_a_wrong_pacing_is_one_line_naming_the_key():
    with pytest.raises(ConfigError, match=r"timeline.competence.pacing.function: unknown pacing 'cubic'.*linear"):
        parse_timeline({"competence": {"pacing": {"function": "cubic"}}})
    with pytest.raises(ConfigError, match=r"timeline.competence.pacing.start"):
        parse_timeline({"competence": {"pacing": {"function": "root", "start": 0}}})


def test_ranks_follow_the_scores_and_ties_are_seeded():
    domains = np.array(["prose", "code", "prose", "arithmetic", "code", "arithmetic"])
    scores = domain_order_scores(domains, ["arithmetic", "code", "prose"], key="curriculum.domain_order")
    assert scores.tolist() == [2, 1, 2, 0, 1, 0]
    order, difficulty = rank_difficulty(scores, seed=0)
    assert sorted(order[:2]) == [3, 5] and sorted(order[2:4]) == [1, 4] and sorted(order[4:]) == [0, 2]
    assert difficulty[order].tolist() == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert rank_difficulty(scores, seed=0)[0].tolist() == order.tolist()
    with pytest.raises(ConfigError, match=r"curriculum.domain_order: .*missing prose"):
        domain_order_scores(domains, ["arithmetic", "code"], key="curriculum.domain_order")


def test_each_step_draws_only_from_the_easiest_competence_share():
    n = 200
    order = np.random.default_rng(0).permutation(n)          # easiest first
    rank_of = np.empty(n, int)
    rank_of[order] = np.arange(n)
    tl = timeline({"function": "linear", "start": 0.1, "until": 0.5}, max_steps=20)  # all rows from step 10
    sampler = PacedDifficultySampler(order, tl, **LAYOUT)
    batches = iter(sampler)
    seen_late = set()
    for step in range(20):
        rows = next(batches) + next(batches)                  # the step's two micro-batches
        assert len(set(rows)) == 4                            # without replacement within a step
        limit = math.ceil(tl.value("competence", step) * n)   # 20 rows at step 0, 38 at step 1, ...
        assert max(rank_of[rows]) < limit
        if step >= 10:
            seen_late |= set(rank_of[rows].tolist())
    assert max(rank_of[r] for r in [*sampler.slots(0)]) < 20
    assert max(seen_late) >= 100                              # once every row is in play, hard rows are drawn


def test_paced_sampler_resumes_with_the_same_batches():
    order = np.arange(64)
    tl = timeline({"function": "root", "start": 0.1, "until": 0.5}, max_steps=16)
    full = iter(PacedDifficultySampler(order, tl, **LAYOUT))
    expected = [next(full) for _ in range(20)]
    first = PacedDifficultySampler(order, tl, **LAYOUT)
    it = iter(first)
    got = [next(it) for _ in range(7)]                        # stops inside optimizer step 3
    resumed = PacedDifficultySampler(order, tl, **LAYOUT)
    resumed.load_state_dict(first.state_dict())
    it = iter(resumed)
    got += [next(it) for _ in range(13)]
    assert got == expected
    with pytest.raises(ConfigError, match="another curriculum"):
        resumed.load_state_dict({"epoch": 0, "position": 3})


def test_weights_move_from_down_weighted_hard_rows_to_uniform():
    # MacAvaney et al.: every row in play; w = 1 - d (1 - c): hardest (d = 1) weighs c0 at first, all weigh 1 at c = 1
    difficulty = np.array([0.0, 0.5, 1.0, 0.25])
    tl = timeline({"function": "linear", "start": 0.2, "until": 0.5}, max_steps=20)   # uniform from step 10
    sampler = WeightedDifficultySampler(difficulty, tl, seed=0, micro_batch_size=4, grad_accum=1, world_size=1,
                                        rank=0)
    hook = sampler.hook
    assert isinstance(hook, DifficultyWeights)
    assert hook.weights([0, 1, 2, 3], 0).tolist() == pytest.approx([1.0, 0.6, 0.2, 0.8])
    assert hook.weights([0, 1, 2, 3], 5).tolist() == pytest.approx([1.0, 0.8, 0.6, 0.9])   # c = 0.6
    assert hook.weights([0, 1, 2, 3], 10).tolist() == [1.0, 1.0, 1.0, 1.0]
    rows = next(iter(sampler))                                 # the hook weighs the rows just handed out
    state = SimpleNamespace(step=0, batch={"input_ids": torch.zeros(4, 8, dtype=torch.long)})
    hook.on_batch_start(state)
    assert state.batch["example_weights"].tolist() == pytest.approx((1 - difficulty[rows] * 0.8).tolist())


def test_scored_order_is_the_sorted_rows_every_epoch():
    order = np.array([5, 2, 7, 0, 1, 3, 4, 6])
    sampler = ScoredOrderSampler(order, seed=0, micro_batch_size=2, grad_accum=1, world_size=1, rank=0)
    it = iter(sampler)
    assert [next(it) for _ in range(5)] == [[5, 2], [7, 0], [1, 3], [4, 6], [5, 2]]


@pytest.mark.parametrize("overrides, message", [
    (["curriculum.mode=weight"], r"objective=causal_lm ignores them; use objective=weighted_causal_lm"),
    (["curriculum.mode=weight", "objective=weighted_causal_lm",
      "+timeline.seq_len={unit: step, points: [{at: 0, value: 32}]}"], r"timeline.seq_len cuts rows into pieces"),
    (["curriculum.domain_order=[code,prose]"], r"curriculum: set one of curriculum.scorer and curriculum.domain_order"),
    (["~timeline.competence"], r"curriculum: 'difficulty' follows timeline.competence, which is not declared"),
])
def test_bad_difficulty_configs_are_refused_before_anything_is_built(overrides, message):
    from effitrain.config.compose import compose_config
    from effitrain.config.spec import validate

    with pytest.raises(ConfigError, match=message):
        composed = compose_config(["+recipe=difficulty_curriculum", *overrides])
        validate(composed.cfg, composed.recipes)


def test_a_short_run_sorts_a_random_subset_of_its_own_size():
    from effitrain.curriculum.scored_order import run_subset

    order = np.array([9, 4, 7, 0, 2, 8, 1, 5, 3, 6])        # sorted by score, best last
    subset = run_subset(order, 4, seed=0)
    assert len(subset) == 4 and len(set(subset.tolist())) == 4
    position = {r: i for i, r in enumerate(order.tolist())}
    assert [position[r] for r in subset.tolist()] == sorted(position[r] for r in subset.tolist())  # still sorted
    assert run_subset(order, 10, seed=0).tolist() == order.tolist()                            # long run: all
    assert run_subset(order, 4, seed=0).tolist() == subset.tolist()                            # seeded


# ------------------------------------------------------------------ the builders' direction, from the score source
DOMAINS = ["prose", "code", "arithmetic"] * 20            # 60 rows, declared easiest first below: arithmetic
EASIEST_FIRST = ["arithmetic", "code", "prose"]


def _packed(domains, rows=None):
    import datasets

    rows = rows if rows is not None else [[i % 50] * 8 for i in range(len(domains))]
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"), length=len(rows[0])),
                                  "domain": datasets.Value("string")})   # as packing writes them: fixed length
    return datasets.Dataset.from_dict({"input_ids": rows, "domain": list(domains)}, features=features)


@pytest.mark.parametrize("direction, first, last", [("easy_first", "arithmetic", "prose"),
                                                    ("hard_first", "prose", "arithmetic")])
def test_build_difficulty_starts_at_the_low_score_end_and_hard_first_at_the_other(direction, first, last):
    from effitrain.config.blocks.curriculum import DifficultyParams
    from effitrain.curriculum.difficulty import build_difficulty

    domains = np.array(DOMAINS)
    tl = timeline({"function": "linear", "start": 0.1, "until": 0.5}, max_steps=20)
    paced = build_difficulty(DifficultyParams(domain_order=EASIEST_FIRST, direction=direction), _packed(DOMAINS),
                             timeline=tl, **LAYOUT)
    assert set(domains[paced.slots(0)]) == {first}          # c = 0.1: the 6 rows at the start of the order
    assert set(domains[paced.order[:20]]) == {first} and set(domains[paced.order[-20:]]) == {last}
    weighted = build_difficulty(DifficultyParams(domain_order=EASIEST_FIRST, direction=direction, mode="weight"),
                                _packed(DOMAINS), timeline=tl, **LAYOUT)
    w = weighted.hook.weights(list(range(60)), 0)           # the far end starts near c0, the near end near 1
    assert w[domains == first].min() > w[domains == "code"].max() >= w[domains == "code"].min() > \
        w[domains == last].max()
    assert w.min() == pytest.approx(0.1) and w.max() == 1.0


@pytest.mark.parametrize("order, first", [("ascending", "arithmetic"), ("descending", "prose")])
def test_build_scored_order_puts_the_lowest_score_first_when_ascending(order, first):
    from effitrain.config.blocks.curriculum import ScoredOrderParams
    from effitrain.curriculum.scored_order import build_scored_order

    sampler = build_scored_order(ScoredOrderParams(domain_order=EASIEST_FIRST, order=order, fit_to_run=False),
                                 _packed(DOMAINS), **LAYOUT)
    domains = np.array(DOMAINS)[sampler.order]
    expected = EASIEST_FIRST if order == "ascending" else EASIEST_FIRST[::-1]
    assert [set(domains[i:i + 20]) for i in (0, 20, 40)] == [{d} for d in expected] and domains[0] == first


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    import datasets
    import transformers

    from effitrain.data.tokenizer import train_bpe

    words = "the quick brown fox jumps over the lazy dog while a small cat watches from the warm window".split()
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, 30)) for _ in range(200)]
    folder = tmp_path_factory.mktemp("bpe")
    train_bpe(datasets.Dataset.from_dict({"text": texts}), 300, folder)
    return transformers.PreTrainedTokenizerFast.from_pretrained(str(folder))


def test_a_row_is_scored_whole_so_rows_alike_for_their_first_200_bytes_rank_by_their_tails(bpe):
    """Eight rows continue a shared 200-byte opening with the same sentence again (easy for the proxy), eight with
    random letters (hard).  Scored on their first 127 bytes (the byte proxy's old max_length 128) all 16 tie; scored
    whole, every easy row ranks easier than every hard one, in both builders."""
    from effitrain.config.blocks.curriculum import DifficultyParams, ScoredOrderParams
    from effitrain.curriculum.difficulty import build_difficulty
    from effitrain.curriculum.scored_order import build_scored_order
    from effitrain.config.blocks import load_builtin_blocks

    load_builtin_blocks()
    sentence = "the quick brown fox jumps over the lazy dog. "
    opening = (sentence * 5)[:200]
    rng = np.random.default_rng(1)
    easy = [opening + sentence * 6 for _ in range(8)]
    hard = [opening + "".join(rng.choice(list("qzxjvkwy"), 300)) for _ in range(8)]
    ids = [bpe(text, add_special_tokens=False)["input_ids"] for text in easy + hard]
    width = min(map(len, ids))
    rows = [row[:width] for row in ids]
    decoded = bpe.batch_decode(rows, skip_special_tokens=True)
    assert len({text.encode()[:200] for text in decoded}) == 1 and min(len(t.encode()) for t in decoded) > 300
    packed = _packed(["prose"] * 16, rows)
    scorer = {"name": "perplexity", "proxy_steps": 20, "proxy_batch_size": 8}
    tl = timeline({"function": "linear", "start": 0.1, "until": 0.5}, max_steps=20)
    paced = build_difficulty(DifficultyParams(scorer=scorer), packed, timeline=tl, tokenizer=bpe, **LAYOUT)
    assert sorted(paced.order[:8].tolist()) == list(range(8))            # the easy tails first
    as_recipes_set_it = {**scorer, "max_length": None}                   # null: the whole row, as the recipes say
    descending = build_scored_order(ScoredOrderParams(scorer=as_recipes_set_it, order="descending", fit_to_run=False),
                                    packed, tokenizer=bpe, **LAYOUT)
    assert sorted(descending.order[:8].tolist()) == list(range(8, 16))   # highest loss first: the random tails
