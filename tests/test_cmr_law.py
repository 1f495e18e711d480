"""The CMR scaling law: the paper's power laws recovered from curves they generate, the critical ratio by hand,
and the sweep stage concluding the critical mixture ratio that synthetic member logs (written from the paper's
functional form, as the training loop writes them) imply -- no training.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from effitrain.config.compose import compose_config
from effitrain.config.spec import parse_sweep, validate
from effitrain.config.stages import stage_config
from effitrain.curriculum import cmr_law, cmr_law_sweep
from effitrain.registry import ConfigError


def test_the_two_term_general_law_and_the_one_term_domain_law_are_recovered_from_their_curves():
    tokens = np.linspace(0.5, 12.0, 12)
    general = cmr_law.PowerLaw((-0.3, -0.02), (-0.8, 0.7), 0.4)     # rises, then falls (the paper's U shape)
    law, r2 = cmr_law.fit_power_law(tokens, general(tokens), terms=2)
    assert r2 > 0.999999
    assert law(30.0) == pytest.approx(general(30.0), abs=1e-5)      # extrapolates as the generating law does
    domain = cmr_law.PowerLaw((-0.5,), (0.4,), 0.1)
    law, _ = cmr_law.fit_power_law(tokens, domain(tokens), terms=1)
    assert (law.coefficients[0], law.exponents[0], law.offset) == pytest.approx((-0.5, 0.4, 0.1), abs=1e-6)
    with pytest.raises(ValueError, match="at least 5 points"):
        cmr_law.fit_power_law(tokens[:4], general(tokens[:4]), terms=2)


def test_critical_ratio_is_the_largest_ratio_within_the_tolerance():
    # 0.25 is feasible (0.02), 0.5 is not (0.06): the change reaches 0.05 at 0.25 + 0.03/0.04 * 0.25
    assert cmr_law.critical_ratio([0.5, 0.1, 0.25, 0.75], [0.06, 0.0, 0.02, 0.1], 0.05) == pytest.approx(0.4375)
    assert cmr_law.critical_ratio([0.1, 0.5], [0.01, 0.02], 0.05) == 0.5          # all feasible: the largest
    assert cmr_law.critical_ratio([0.1, 0.5], [0.06, 0.08], 0.05) is None          # none feasible


def test_the_cmr_vs_tokens_law_is_recovered():
    budgets = np.linspace(1.0, 20.0, 8)
    true = cmr_law.PowerLaw((0.1,), (0.3,), 0.05)
    law, _ = cmr_law.fit_cmr_law(budgets, true(budgets))
    assert law(100.0) == pytest.approx(true(100.0), abs=1e-6)


SHARES = {"arithmetic": 0.2, "code": 0.25, "docstrings": 0.25, "prose": 0.3}


def _ratios_stage(monkeypatch, *overrides):
    # the token shares come from the data (tested with regmix); fixed here so the test needs no data build
    monkeypatch.setattr(cmr_law_sweep, "token_distribution", lambda cfg: dict(SHARES))
    cfg = compose_config(["+recipe=cmr_law", *overrides]).cfg
    spec = validate(cfg)
    stage = spec.stages[1]
    run_cfg = stage_config(cfg, stage, init_model="/nonexistent/base", final_models={}, concluded={})
    return cfg, spec, run_cfg, parse_sweep(stage).build()


TOKENS_PER_STEP = 1024
F = cmr_law.PowerLaw((0.2, -0.1), (0.3, -0.4), 1.0)    # the paper's two-term form, scaled by the ratio below


def _member_logs(tmp_path, members, k, eval_steps):
    """Each member's metrics.jsonl as the loop writes it, its general-loss change k * r * F(T) (so the change at a
    budget is linear in the ratio: the CMR there is known exactly) and a one-term domain change."""
    general = [d for d in SHARES if d != "code"]
    results = []
    for name, member in members:
        r = member["timeline"]["mixture"]["points"][0]["value"]["code"]
        lines = []
        for step in [0, *eval_steps]:
            t = step * TOKENS_PER_STEP / cmr_law_sweep.TOKEN_UNIT
            d_gen = k * r * F(t) if step else 0.0
            d_dom = -0.5 * r * t ** 0.3 if step else 0.0
            row = {"step": step, "tokens": step * TOKENS_PER_STEP, "eval_loss/code": 5.0 + d_dom}
            row.update({f"eval_loss/{d}": 4.0 + d_gen for d in general})   # every general domain moves alike
            lines.append(json.dumps(row))
        run_dir = tmp_path / name
        run_dir.mkdir()
        (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        steps = max(eval_steps)
        results.append((name, {**member, "run_dir": str(run_dir)},
                        {"finished": True, "steps": steps, "tokens": steps * TOKENS_PER_STEP}))
    return results


def _true_cmr(k, steps):
    return 0.05 / (k * F(steps * TOKENS_PER_STEP / cmr_law_sweep.TOKEN_UNIT))


def test_the_sweep_concludes_the_critical_ratio_its_members_curves_imply(tmp_path, monkeypatch):
    cfg, spec, run_cfg, sweep = _ratios_stage(monkeypatch, "stages.1.sweep.budget_steps=24")
    members = sweep.members(run_cfg, say=lambda _: None)
    assert [m[0] for m in members] == ["ratio-0.1250", "ratio-0.2500", "ratio-0.5000", "ratio-0.7500"]
    general = {d: w / 0.75 for d, w in SHARES.items() if d != "code"}
    mix = members[2][1]["timeline"]["mixture"]["points"][0]["value"]      # ratio 0.5: the rest in general shares
    assert mix == pytest.approx({"code": 0.5, **{d: 0.5 * w for d, w in general.items()}}, abs=1e-6)

    k = 0.05 / (0.4 * F(24 * TOKENS_PER_STEP / cmr_law_sweep.TOKEN_UNIT))   # the change reaches 0.05 at r = 0.4
    results = _member_logs(tmp_path, members, k, range(5, 31, 5))
    delta, record = sweep.conclude(run_cfg, results, say=lambda _: None)
    assert record["fitted"] and record["critical_mixture_ratio"] == pytest.approx(0.4, abs=1e-4)
    value = delta["timeline"]["mixture"]["points"][0]["value"]
    assert value["code"] == pytest.approx(0.4, abs=1e-4)
    assert sum(value.values()) == pytest.approx(1.0, abs=1e-9)
    # the main stage continues the base on that mixture
    main = stage_config(cfg, spec.stages[2], init_model="/nonexistent/base", final_models={},
                        concluded={"ratios": delta})
    assert main["timeline"]["mixture"]["points"][0]["value"] == value


def test_a_budget_beyond_the_members_is_extrapolated_by_the_cmr_law(tmp_path, monkeypatch):
    _, _, run_cfg, sweep = _ratios_stage(monkeypatch, "stages.1.sweep.budget_steps=45")
    members = sweep.members(run_cfg, say=lambda _: None)
    k = 0.05 / (0.4 * F(30 * TOKENS_PER_STEP / cmr_law_sweep.TOKEN_UNIT))
    _, record = sweep.conclude(run_cfg, _member_logs(tmp_path, members, k, range(5, 31, 5)), say=lambda _: None)
    assert len(record["cmr_law"]["points"]) == 8
    # the true CMR falls from 0.4 at the members' 30 steps to _true_cmr(k, 45) at the budget; Eq. 8 follows it
    assert _true_cmr(k, 45) < 0.39
    assert record["critical_mixture_ratio"] == pytest.approx(_true_cmr(k, 45), abs=0.01)


def test_members_too_short_to_fit_conclude_from_the_measured_changes(tmp_path, monkeypatch):
    _, _, run_cfg, sweep = _ratios_stage(monkeypatch)
    members = sweep.members(run_cfg, say=lambda _: None)
    k = 0.05 / (0.4 * F(2 * TOKENS_PER_STEP / cmr_law_sweep.TOKEN_UNIT))
    _, record = sweep.conclude(run_cfg, _member_logs(tmp_path, members, k, [2]), say=lambda _: None)
    # one evaluation after the start: no law, the changes measured at step 2, which reach 0.05 at r = 0.4
    assert record["fitted"] is False and record["budget_steps"] == 2
    assert record["critical_mixture_ratio"] == pytest.approx(0.4, abs=1e-6)


@pytest.mark.parametrize("override, message", [
    ("stages.1.sweep.domain=cod", "stages.ratios.sweep.domain: 'cod' is not a domain of the stage's data "
                                  "(did you mean 'code'?)"),
    ("stages.1.sweep.ratios=[0.5]", "stages.ratios.sweep.ratios: give at least two distinct domain ratios"),
    ("stages.1.sweep.ratios=[0.5,1.0]", "stages.ratios.sweep.ratios: give at least two distinct domain ratios"),
])
def test_bad_sweep_settings_are_refused_at_check_time(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(compose_config(["+recipe=cmr_law", override]).cfg)
