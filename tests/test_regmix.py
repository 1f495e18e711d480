"""RegMix: proxy mixtures around the token distribution, a regression of their losses, the predicted-best mixture,
and the sweep stage that runs it all in one pipeline.

What holds: the proxies' mixtures are distinct points of the simplex on the ``minimum`` grid, inside the usage
bound, centred on the tempered prior; the regression + simulation finds the optimum of a crafted loss; the sweep
stage trains one run per proxy, writes the predicted-best mixture, and the main stage trains on it; a resumed
pipeline re-runs only the member that had not finished and concludes exactly the same mixture.
"""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import yaml

from effitrain.config.compose import compose_config
from effitrain.config.spec import validate
from effitrain.config.stages import stage_config
from effitrain.curriculum import regmix
from effitrain.curriculum.regmix_sweep import mixture_delta
from effitrain.registry import ConfigError


# ---------------------------------------------------------------------------------------------- proxy mixtures
def test_proxy_mixtures_are_distinct_grid_points_of_the_simplex_inside_the_usage_bound():
    prior = [0.5, 0.3, 0.15, 0.05]
    mixes = regmix.proxy_mixtures(prior, 64, seed=0, max_usage=3.0, minimum=1e-3)
    assert mixes.shape == (64, 4)
    np.testing.assert_allclose(mixes.sum(axis=1), 1.0, atol=4 * 1e-3)          # rounding to the grid
    np.testing.assert_allclose(mixes / 1e-3, np.round(mixes / 1e-3), atol=1e-9)  # multiples of `minimum`
    assert len({tuple(m) for m in mixes}) == 64                                  # no proxy trained twice
    # the bound: at most max_usage x the natural share (0.05 x 3 = 0.15 for the last domain), up to the rounding
    assert (mixes <= np.minimum(np.array(prior) * 3.0, 1.0) + 1e-3).all()
    np.testing.assert_array_equal(mixes, regmix.proxy_mixtures(prior, 64, seed=0, max_usage=3.0, minimum=1e-3))
    assert not np.array_equal(mixes, regmix.proxy_mixtures(prior, 64, seed=1, max_usage=3.0, minimum=1e-3))


def test_dirichlet_draws_centre_on_the_prior_and_leave_absent_domains_at_zero():
    rng = np.random.default_rng(0)
    for strength in (0.1, 1.0, 5.0):   # the strength changes the spread, never the mean
        draws = regmix.dirichlet_around([0.6, 0.3, 0.1, 0.0], strength, 20000, rng)
        assert draws.mean(axis=0) == pytest.approx([0.6, 0.3, 0.1, 0.0], abs=0.01)
        assert (draws[:, 3] == 0).all()
    # the proxies' prior is tempered: (0.64, 0.36) ** 0.5 = (0.8, 0.6), renormalised (0.5714, 0.4286); with only
    # the largest strength and no rounding, the proxies' mean is that tempered prior
    mixes = regmix.proxy_mixtures([0.64, 0.36], 200, seed=0, min_strength=50.0, max_strength=50.0, minimum=1e-6,
                                  sample_multiplier=2)
    assert mixes.mean(axis=0) == pytest.approx([0.8 / 1.4, 0.6 / 1.4], abs=0.01)


def test_too_many_proxies_for_the_distinct_mixtures_the_bound_allows_is_a_config_error():
    with pytest.raises(ConfigError, match=r"sweep.num_proxies: only \d+ distinct mixtures"):
        regmix.proxy_mixtures([0.5, 0.5], 50, seed=0, minimum=0.05, sample_multiplier=2)


# ---------------------------------------------------------------------------------------------- regression
def test_linear_regression_and_simulation_put_the_weight_on_the_domain_that_lowers_the_loss():
    rng = np.random.default_rng(0)
    x = rng.dirichlet([1, 1, 1], 32)
    y = 4.0 - 2.0 * x[:, 2] + 0.5 * x[:, 0]                  # domain 2 helps, domain 0 hurts
    model = regmix.fit_regression(x, y, kind="linear", seed=0)
    np.testing.assert_allclose(model.predict(x), y, atol=1e-9)
    best, predicted = regmix.predicted_best(model, [1 / 3] * 3, num_samples=20000, top_k=64, seed=0)
    assert best.sum() == pytest.approx(1.0) and best[2] > 0.95 and best[0] < 0.01
    assert predicted == pytest.approx(4.0 - 2.0 * best[2] + 0.5 * best[0], abs=1e-9)


def test_lightgbm_finds_an_interior_optimum_of_a_crafted_loss():
    pytest.importorskip("lightgbm")
    optimum = np.array([0.1, 0.2, 0.3, 0.4])
    rng = np.random.default_rng(0)
    x = rng.dirichlet(np.ones(4), 128)
    y = ((x - optimum) ** 2).sum(axis=1)
    model = regmix.fit_regression(x, y, kind="lightgbm", seed=0)
    best, _ = regmix.predicted_best(model, np.ones(4) / 4, num_samples=4000, top_k=64, seed=0)
    assert np.abs(best - optimum).max() < 0.08      # the mean of the 64 best of 4,000 simulated mixtures


def test_mixture_delta_sums_to_exactly_one_and_trains_the_mixture_from_the_first_step():
    delta = mixture_delta(["a", "b", "c"], np.array([1 / 3, 1 / 3, 1 / 3]))
    value = delta["timeline"]["mixture"]["points"][0]["value"]
    assert value == {"a": 0.333334, "b": 0.333333, "c": 0.333333} and sum(value.values()) == pytest.approx(1, abs=1e-12)
    assert delta["curriculum"] == {"name": "mixture"} and delta["timeline"]["mixture"]["points"][0]["at"] == 0


# ---------------------------------------------------------------------------------------------- sweep stages
def _validate(*overrides):
    composed = compose_config(list(overrides))
    return validate(composed.cfg, composed.recipes)


def test_the_recipe_is_a_sweep_stage_then_a_main_stage_that_takes_its_concluded_config():
    spec = _validate("+recipe=regmix")
    proxies, main = spec.stages
    assert proxies.sweep == {"name": "regmix", "num_proxies": 16, "target": "prose", "regression": "lightgbm"}
    assert main.config_from == "proxies" and main.init == "scratch"
    assert spec.stage_specs[0].block("model").params.hidden_size == 64     # the proxies are smaller ...
    assert spec.stage_specs[1].block("model").params.hidden_size == 128    # ... than the main model
    # at run time the concluded delta wins over the recipe's uniform stand-in
    cfg = compose_config(["+recipe=regmix"]).cfg
    concluded = {"proxies": mixture_delta(["arithmetic", "code", "docstrings", "prose"],
                                          np.array([0.1, 0.2, 0.3, 0.4]))}
    run = stage_config(cfg, main, init_model=None, final_models={}, concluded=concluded)
    assert run["timeline"]["mixture"]["points"] == [
        {"at": 0, "value": {"arithmetic": 0.1, "code": 0.2, "docstrings": 0.3, "prose": 0.4}}]
    validate(run)


@pytest.mark.parametrize("stages, message", [
    ("[{name: p, sweep: {name: regmx}}, {name: m, init: scratch}]", "did you mean 'regmix'"),
    ("[{name: p, sweep: {name: regmix, num_proxies: 2}}, {name: m, init: scratch}]",
     "stages.p.sweep.num_proxies: 2 is out of range"),
    ("[{name: p, sweep: {name: regmix}}, {name: m}]",
     "stages.m.init: the previous stage 'p' is a sweep and leaves no model; set init: scratch"),
    ("[{name: p, sweep: {name: regmix}}, {name: m, init: scratch, config_from: q}]",
     "stages.m.config_from: 'q' must name an earlier sweep stage; earlier sweep stages: p"),
    ("[{name: a}, {name: m, init: scratch, config_from: a}]", "earlier sweep stages: none"),
    ("[{name: p, sweep: {name: regmix, target: pros}}, {name: m, init: scratch}]",
     "stages.p.sweep.target: 'pros' is not a domain of the stage's data (did you mean 'prose'?); valid: all, "
     "arithmetic, code, docstrings, prose"),
])
def test_bad_sweep_stages_are_one_line_errors(stages, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        _validate(f"+stages={stages}")


@pytest.mark.slow
def test_sweep_trains_the_proxies_concludes_a_mixture_and_a_resume_reruns_only_the_unfinished_member(
        tmp_path, train_in_process):
    overrides = ["+recipe=regmix", "train.max_steps=2", "stages.0.sweep.num_proxies=4",
                 "+stages.0.sweep.num_samples=2000", "+stages.0.sweep.top_k=16",
                 "stages.0.sweep.regression=linear"]
    run = tmp_path / "run"
    summary = train_in_process(overrides, run)
    assert summary["finished"] and [r["stage"] for r in summary["stages"]] == ["proxies", "main"]
    sweep_dir = run / "stages" / "01-proxies"
    concluded = yaml.safe_load((sweep_dir / "concluded.yaml").read_text())
    members = sorted(p.name for p in (sweep_dir / "members").iterdir())
    assert members == ["proxy-000", "proxy-001", "proxy-002", "proxy-003"]
    proxies = concluded["record"]["proxies"]
    for row in proxies:   # each member trained on its own mixture and reported its prose eval loss
        cfg = yaml.safe_load((sweep_dir / "members" / row["name"] / "config.yaml").read_text())
        assert cfg["timeline"]["mixture"]["points"][0]["value"] == {d: w for d, w in row["mixture"].items() if w > 0}
        assert cfg["train"]["save_final_model"] is False
        member = yaml.safe_load((sweep_dir / "members" / row["name"] / "summary.json").read_text())
        assert member["eval_losses"]["prose"] == row["loss"]
    main_cfg = yaml.safe_load((run / "stages" / "02-main" / "config.yaml").read_text())
    assert main_cfg["timeline"]["mixture"] == concluded["config"]["timeline"]["mixture"]

    # kill-and-resume of the sweep: member 3 and the conclusion never happened (the finished main stage is kept, so
    # the resumed pipeline's work is the one member and the conclusion)
    shutil.rmtree(sweep_dir / "members" / "proxy-003")
    (sweep_dir / "concluded.yaml").unlink()
    (sweep_dir / "summary.json").unlink()
    before = {m: (sweep_dir / "members" / m / "summary.json").stat().st_mtime_ns for m in members[:3]}
    again = train_in_process([*overrides, "resume=auto"], run)
    assert again["finished"] and [r["skipped_as_finished"] for r in again["stages"]] == [False, True]
    assert {m: (sweep_dir / "members" / m / "summary.json").stat().st_mtime_ns for m in members[:3]} == before
    assert yaml.safe_load((sweep_dir / "concluded.yaml").read_text()) == concluded   # the same losses, same mixture
