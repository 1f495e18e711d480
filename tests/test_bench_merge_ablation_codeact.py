"""The pure parts of scripts/bench_merge_ablation.py and scripts/bench_codeact.py: which candidates are trained, the
rank correlation, the config check, the tables, and the steps of codeact's equal-passes arm (no training)."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from conftest import REPO


def _script(name):
    sys.path.insert(0, str(REPO / "scripts"))
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_merge = _script("bench_merge_ablation")
bench_codeact = _script("bench_codeact")


def test_candidates_leave_out_the_vertices_and_span_the_ranking():
    mixtures = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5], [0.25, 0.25, 0.5],
                [0.5, 0.25, 0.25], [0.25, 0.5, 0.25]]
    losses = [0.1, 0.2, 0.3, 5.0, 4.0, 3.0, 2.0, 1.0, 6.0]      # the vertices rank best: they must not be picked
    picked = bench_merge.pick_candidates(mixtures, losses, 3)
    assert picked == [7, 5, 8]                                # best, middle and worst of the six inner mixtures
    assert bench_merge.pick_candidates(mixtures, losses, 6) == [7, 6, 5, 4, 3, 8]
    with pytest.raises(ValueError, match="only 6"):
        bench_merge.pick_candidates(mixtures, losses, 7)


def test_spearman_is_the_rank_correlation():
    assert bench_merge.spearman([1, 2, 3, 4], [10, 20, 30, 40])[0] == pytest.approx(1.0)
    assert bench_merge.spearman([1, 2, 3, 4], [9, 5, 2, 1])[0] == pytest.approx(-1.0)
    # one swap of neighbours among 4: rho = 1 - 6 * 2 / (4 * 15) = 0.8, whatever the values' scale
    assert bench_merge.spearman([1, 2, 3, 4], [1, 3, 2, 1000])[0] == pytest.approx(0.8)


def test_config_differences_ignore_only_the_run_dir_and_the_mixture():
    a = {"run_dir": "/a", "timeline": {"mixture": {"points": [1]}, "lr": 1}, "train": {"max_steps": 30}}
    b = {"run_dir": "/b", "timeline": {"mixture": {"points": [2]}, "lr": 1}, "train": {"max_steps": 30}}
    assert bench_merge.config_differences(a, b) == []
    b["recipe"] = {"name": "merge_ablation"}                       # metadata, not a setting
    b["train"]["liger"] = False                                   # unset on one side, its false default on the other
    assert bench_merge.config_differences(a, b) == []
    b["train"]["max_steps"], b["model"], a["train"]["fp8"] = 31, {"path": "x"}, True
    assert bench_merge.config_differences(a, b) == ["model.path", "train.fp8", "train.max_steps"]


def test_tables_rank_both_columns_and_mark_the_choice():
    rows = [{"mixture": {"a": 0.5, "b": 0.5, "c": 0.0}, "proxy_ppl": 10.0, "trained_ppl": 30.0, "chosen": True},
            {"mixture": {"a": 0.25, "b": 0.25, "c": 0.5}, "proxy_ppl": 20.0, "trained_ppl": 25.0, "chosen": False},
            {"mixture": {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}, "proxy_ppl": 30.0, "trained_ppl": 35.0}]
    table = bench_merge.seed_table(rows).splitlines()
    assert table[2] == "| a 0.5, b 0.5 (the recipe's choice) | 10.00 | 1 | 30.00 | 2 |"
    assert table[3] == "| a 0.25, b 0.25, c 0.5 | 20.00 | 2 | 25.00 | 1 |"
    summary = bench_merge.summary_table({0: {"rows": rows, "rho": 0.5, "p": 0.667}}).splitlines()[2]
    assert summary.startswith("| 0 | 3 | 0.50 (0.67) | a 0.5, b 0.5 | 2 of 3 | a 0.25, b 0.25, c 0.5 | 30.00 / 25.00 / 35.00")


def test_codeact_same_passes_steps_match_sfts_passes():
    sft = {"steps": 150, "global_batch_size": 8, "train_sequences": 600}          # 2 passes
    codeact = {"steps": 150, "global_batch_size": 8, "train_sequences": 228}
    assert bench_codeact.same_passes_steps(sft, codeact) == 57                    # 2 x 228 / 8
    assert bench_codeact.same_passes_steps(sft, {**codeact, "train_sequences": 229}) == 58   # rounded up


def test_codeact_tables_give_the_gap_to_sft_seed_by_seed():
    rows = [{"arm": "sft", "seed": 0, "conversations": 4000, "rows": 600, "steps": 150, "passes": 2.0, "acc": 0.03125,
             "loss": 2.6, "questions": 64},
            {"arm": "codeact", "seed": 0, "conversations": 1596, "rows": 228, "steps": 150, "passes": 5.26,
             "acc": 0.0, "loss": 3.1, "questions": 64}]
    assert bench_codeact.arm_table(rows).splitlines()[2] == "| sft | 0 | 4000 | 600 | 150 | 2.00 | 0.031 (2 of 64) | 2.600 |"
    assert bench_codeact.mean_table(rows).splitlines()[3] == "| codeact | 0.000 | 3.100 | +0.500 |"
