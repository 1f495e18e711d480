"""scripts/bench_laws.py's pure parts: the prediction errors, the feasibility of the CMR arms, the config check that
the held-out runs differ from the fitted ones only where they should, and the marked section it writes."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import bench_laws  # noqa: E402  (scripts/ is not a package)
from _sections import replace_marked_section, with_reading  # noqa: E402


def test_window_errors_are_the_last_windows_signed_error_and_the_mean_absolute_error():
    e = bench_laws.window_errors([5.0, 4.6, 4.1], [5.2, 4.5, 4.0])
    assert e["final_error"] == pytest.approx(0.1)                     # predicted - measured, signed
    assert e["mae"] == pytest.approx((0.2 + 0.1 + 0.1) / 3)
    assert e["mae_pct"] == pytest.approx(100 * e["mae"] / np.mean([5.2, 4.5, 4.0]))
    with pytest.raises(ValueError):
        bench_laws.window_errors([1.0, 2.0], [1.0])


def test_the_law_predicting_its_own_curve_has_no_error_and_a_shifted_schedule_some():
    from effitrain.curriculum import anneal_law

    law = anneal_law.AnnealLaw(L0=3.0, A=2.0, alpha=0.5, C=200.0)
    lrs = np.full(100, 1e-3)
    lrs[80:] = np.linspace(1e-3, 1e-4, 20)
    steps = list(range(10, 101, 10))
    per_step = anneal_law.predict(law, lrs)
    curve = anneal_law.curve_from_log(lrs, steps, [1.0] * len(steps), warmup_steps=0, decay_factor=0.999)
    windows = curve.window_means(per_step)
    assert bench_laws.window_errors(windows, windows)["mae"] == 0.0
    constant = curve.window_means(anneal_law.predict(law, np.full(100, 1e-3)))
    # the decay lowers only the last two windows' loss: the constant schedule's curve is off there alone
    e = bench_laws.window_errors(constant, windows)
    assert e["final_error"] > 0 and e["mae"] == pytest.approx(np.abs(constant - windows)[-2:].sum() / len(windows))


def test_general_loss_weights_the_general_domains_by_their_shares():
    row = {"eval_loss/arithmetic": 3.0, "eval_loss/prose": 6.0, "eval_loss/code": 9.0}
    assert bench_laws.general_loss(row, {"arithmetic": 0.25, "prose": 0.75}) == pytest.approx(5.25)


def test_arm_verdicts_mark_feasible_arms_and_the_best_domain_loss_among_them():
    arms = [{"ratio": 0.0, "general_change": -0.2, "domain": 6.0},
            {"ratio": 0.4, "general_change": 0.04, "domain": 5.0},
            {"ratio": 0.8, "general_change": 0.09, "domain": 4.5}]      # lowest domain loss, but infeasible
    out = bench_laws.arm_verdicts(arms, 0.05)
    assert [a["feasible"] for a in out] == [True, True, False]
    assert [a["best_feasible"] for a in out] == [False, True, False]
    assert not any(a["best_feasible"] for a in bench_laws.arm_verdicts(arms[2:], 0.05))


def test_config_differences_name_the_dotted_keys():
    a = {"scheduler": {"name": "cosine", "warmup_steps": 10}, "train": {"seed": 0}, "run_dir": "x"}
    b = {"scheduler": {"name": "wsd", "warmup_steps": 10, "decay_fraction": 0.2}, "train": {"seed": 0},
         "run_dir": "y", "timeline": {"lr": {"unit": "step"}}}
    assert bench_laws.config_differences(a, b) == ["run_dir", "scheduler.decay_fraction", "scheduler.name",
                                                   "timeline"]
    # a switch one block lacks and the other leaves off (false or null) is not a difference; one that is on is
    stage = {"model": {"name": "pretrained", "attn_implementation": "sdpa"}}
    plain = {"model": {"name": "pretrained", "attn_implementation": "sdpa", "liger_kernels": False, "revision": None}}
    assert bench_laws.config_differences(stage, plain) == []
    assert bench_laws.config_differences(stage, {"model": {**plain["model"], "liger_kernels": True}}) == \
        ["model.liger_kernels"]


def test_the_multistep_schedule_and_the_override_grammar():
    points = bench_laws.multistep_points(300)
    assert [p["at"] for p in points] == [0, 10, 180, 181, 255, 256]
    assert [p["value"] for p in points] == [0.0, 1.0, 1.0, 0.316, 0.316, 0.1]
    assert bench_laws._flow({"unit": "step", "points": [{"at": 0, "value": {"code": 0.5}}]}) == \
        "{unit:step,points:[{at:0,value:{code:0.5}}]}"


def test_tables_print_every_figure_and_the_section_replaces_only_its_own_text(tmp_path):
    rows = [{"name": "wsd_20", "what": "WSD", "predicted_final": 5.1234, "measured_final": 5.2, "final_error": -0.0766,
             "mae": 0.05, "mae_pct": 0.9, "anchored_mae": 0.02, "anchored_final_error": 0.01, "naive_mae": 0.03}]
    table = bench_laws.anneal_table(rows)
    assert "| wsd_20: WSD | 5.123 | 5.200 | -0.077 | 0.050 (0.90%) | 0.020 (+0.010 at the end) | 0.030 |" in table
    arms = bench_laws.arm_verdicts([{"ratio": 0.5, "label": "the CMR", "general": 4.0, "general_change": 0.01,
                                     "domain": 5.5}], 0.05)
    assert "| 0.500 (the CMR) | 4.000 | +0.010 | 5.500 | -0.500 | yes, lowest code loss of the feasible arms |" in \
        bench_laws.cmr_table(arms, 0.5, {"general": 3.99, "domain": 6.0})
    doc = tmp_path / "benchmarks.md"
    head = f"# B\n\n## Curricula\n\nkept\n\n{bench_laws.SECTION_TITLE}\n\n{bench_laws.SECTION_START}\nold\n"
    doc.write_text(head + f"{bench_laws.SECTION_END}\n\n## Next\n\nkept too\n")
    start = f"{bench_laws.SECTION_TITLE}\n\n{bench_laws.SECTION_START}"
    replace_marked_section(doc, start, bench_laws.SECTION_END, f"{start}\nnew\n{bench_laws.SECTION_END}\n")
    assert doc.read_text() == (f"# B\n\n## Curricula\n\nkept\n\n{start}\nnew\n{bench_laws.SECTION_END}\n\n"
                               f"## Next\n\nkept too\n")


def test_the_cmr_arms_and_their_mixtures():
    assert bench_laws.cmr_arms(0.3, [0, 0.5, 2, 1]) == [(0.0, "all general"), (0.15, "0.5x CMR"), (0.6, "2x CMR"),
                                                        (1.0, "all domain")]
    assert bench_laws.cmr_arms(0.7, [2]) == [(0.85, "halfway from the CMR to 1 (2x passes 1)")]
    shares = {"arithmetic": 0.5, "prose": 0.5}
    ov = bench_laws.arm_overrides(0.2, shares, "code", "/m", 5, 60, ["train.seed=0"])
    assert ov == ["model=pretrained", "model.path=/m", "curriculum=mixture",
                  "+timeline.mixture={unit:step,points:[{at:0,value:{arithmetic:0.4,code:0.2,prose:0.4}}]}",
                  "scheduler.warmup_steps=5", "train.max_steps=60", "train.seed=0"]
    # the main stage's other model settings are the arms' too (not its name or path, nor what it leaves null)
    ov = bench_laws.arm_overrides(0.2, shares, "code", "/m", 5, 60, [], {"name": "pretrained", "path": "/x",
                                                                         "attn_implementation": "sdpa",
                                                                         "revision": None})
    assert ov[:3] == ["model=pretrained", "model.path=/m", "model.attn_implementation=sdpa"]
    # all general: the domain is left out of the mixture (a zero weight is no weight)
    assert "value:{arithmetic:0.5,prose:0.5}" in bench_laws.arm_overrides(0.0, shares, "code", "/m", 5, 60, [])[3]


def test_the_anchored_prediction_cancels_noise_common_to_both_runs():
    rng = np.random.default_rng(0)
    batch_noise = rng.normal(0, 0.2, 20)                    # the same batches in both runs
    law_constant, law_decay = np.linspace(6, 5, 20), np.linspace(6, 4.5, 20)
    measured_constant, measured_decay = law_constant + batch_noise, law_decay + batch_noise
    anchored = bench_laws.anchored_prediction(law_decay, law_constant, measured_constant)
    assert bench_laws.window_errors(anchored, measured_decay)["mae"] == pytest.approx(0, abs=1e-12)
    assert bench_laws.window_errors(law_decay, measured_decay)["mae"] > 0.1   # the law alone carries the noise


def test_a_scripts_reading_in_docs_readings_follows_its_section_body(tmp_path):
    """Every benchmark script's --write appends docs/readings/<its stem>.md (prose kept across reruns) the same way."""
    (tmp_path / "scripts").mkdir()
    (tmp_path / "docs" / "readings").mkdir(parents=True)
    script = tmp_path / "scripts" / "bench_x.py"
    assert with_reading("| table |\n", str(script)) == "| table |\n"          # no reading: the body alone
    (tmp_path / "docs" / "readings" / "bench_x.md").write_text("Reading: what the table says.\n\n")
    assert with_reading("| table |\n", str(script)) == "| table |\n\nReading: what the table says.\n"
