"""The reproduction ledger (docs/reproductions.md) and the results files it is generated from (docs/results/*.json).

What must hold: every recipe has a row with a verdict (and a reason when nothing was measured); every figure in a
results file is printed in the docs/benchmarks.md section it names, beside the command that wrote it; the verdict
follows the per-seed gains against the stated noise; the ledger and the cards' reproduction rows are regenerated
from the files, so a changed file leaves them stale until `effitrain lock` runs.
"""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import REPO
from effitrain.config.tree import group_options
from effitrain.config.ledger import (LEDGER, NOT_MEASURED, OPPOSITE, REPRODUCED, WITHIN_NOISE, card_row, ledger_text,
                                     load_results, parse_measurement, unsupported_values)
from effitrain.registry import ConfigError

DOCS = REPO / "docs"


def _measurement(recipe, baseline, *, better="lower", expect="better", noise=0.03, seeds="auto"):
    return parse_measurement({
        "label": "l", "metric": "eval loss", "better": better, "expect": expect, "recipe": recipe,
        "baseline": baseline, "baseline_name": "baseline", "noise": noise, "command": "python x.py",
        "source": "a run", "seeds": list(range(len(recipe))) if seeds == "auto" else seeds}, "test")


def test_every_recipe_has_a_row_with_a_verdict_and_a_reason_when_not_measured():
    recipes = group_options("recipe")
    results = load_results()
    assert sorted(results) == sorted(recipes)
    ledger = (DOCS / LEDGER).read_text()
    rows = [line for line in ledger.splitlines() if line.startswith("| [`")]
    assert len(rows) == len(recipes)
    for name, result in results.items():
        assert f"| [`{name}`](recipes/{name}.md) |" in ledger
        assert all(m.verdict() in (REPRODUCED, WITHIN_NOISE, OPPOSITE) for m in result.measurements)
        if not result.measurements:
            assert result.verdict().startswith(f"{NOT_MEASURED}: ") and len(result.not_measured) > 20, \
                f"{name}: 'not measured' needs a reason"


def test_the_ledger_on_disk_is_what_the_results_files_give():
    # `effitrain lock --check` (tests/test_provenance.py) checks every generated file; this is the ledger alone
    assert (DOCS / LEDGER).read_text() == ledger_text(load_results(), list(group_options("recipe"))), \
        "docs/reproductions.md is stale; run 'effitrain lock' and commit it"


def test_every_figure_is_printed_in_the_benchmark_section_it_names_beside_its_command():
    problems = [p for result in load_results().values() for p in unsupported_values(result)]
    assert not problems, "\n".join(problems)


def test_a_figure_the_benchmarks_do_not_print_is_caught(tmp_path):
    results = load_results()
    g_stack = results["g_stack"]
    g_stack.measurements[0].recipe[1] = 5.1234          # a value no command wrote
    g_stack.measurements[0].commands = ["python scripts/bench_growth.py --seeds 7"]
    assert unsupported_values(g_stack) == [
        "g_stack: measurement 0: 5.1234 is not in section 'G_stack vs training the large model from scratch'",
        "g_stack: measurement 0: its command is not in section 'G_stack vs training the large model from scratch'"]


def test_the_verdict_follows_the_per_seed_gains_against_the_noise():
    assert _measurement([5.5, 5.6, 5.5], [5.7, 5.7, 5.8]).verdict() == REPRODUCED       # every seed better, > noise
    assert _measurement([5.5, 5.8, 5.5], [5.7, 5.7, 5.8]).verdict() == WITHIN_NOISE     # one seed worse
    assert _measurement([5.9, 5.8], [5.7, 5.7]).verdict() == OPPOSITE
    assert _measurement([5.71], [5.7]).verdict() == WITHIN_NOISE                         # one seed, inside the noise
    assert _measurement([5.6], [5.7]).verdict() == REPRODUCED
    # higher is better (accuracy): the sign turns; a single baseline value is shared by every seed
    assert _measurement([0.6, 0.7], [0.5], better="higher").verdict() == REPRODUCED
    assert _measurement([0.4, 0.45], [0.5], better="higher").verdict() == OPPOSITE
    m = _measurement([5.5, 5.6, 5.5], [5.7, 5.7, 5.8])
    assert m.gains() == pytest.approx([0.2, 0.1, 0.3]) and m.spread() == pytest.approx(0.1)
    # a claim of matching: within noise supports it, and the row says which claim it was
    match = _measurement([5.71], [5.7], expect="no worse")
    assert match.holds() and not _measurement([5.71], [5.7]).holds()
    # a figure no seed moves (a tensor's size): exact, one value
    assert _measurement([0.61], [1.0], noise=0.0, seeds=None).seeds_text() == "no seed moves it"


def test_a_changed_results_file_changes_the_ledger_and_the_card_row(tmp_path):
    shutil.copytree(DOCS / "results", tmp_path / "results")
    path = tmp_path / "results" / "salt.json"
    data = json.loads(path.read_text())
    data["measurements"][0]["recipe"] = [5.3]     # now worse than the baseline's 5.1978
    path.write_text(json.dumps(data))
    names = list(group_options("recipe"))
    before, after = load_results(), load_results(tmp_path)
    assert ledger_text(after, names) != ledger_text(before, names)
    assert after["salt"].verdict() == OPPOSITE and before["salt"].verdict() == REPRODUCED
    assert card_row(after["salt"]).startswith("| reproduction | opposite — final eval loss (lower is better): 5.3 vs")


def test_a_bad_results_file_is_one_readable_error(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    good = json.loads((DOCS / "results" / "salt.json").read_text())
    cases = [
        ({**good, "measurements": [{k: v for k, v in good["measurements"][0].items() if k != "noise"}]},
         "docs/results/salt.json.measurements[0]: missing key 'noise'"),
        ({**good, "measurements": [], "not_measured": None},
         "docs/results/salt.json: no measurement and no reason; set not_measured"),
        ({**good, "measurements": [{**good["measurements"][0], "seeds": [0, 1]}]},
         "docs/results/salt.json.measurements[0].seeds: 2 seed(s) for 1 recipe value(s)"),
        ({**good, "measurements": [{**good["measurements"][0], "better": "smaller"}]},
         "docs/results/salt.json.measurements[0].better: 'smaller'; valid: lower, higher"),
        ({**good, "recipe": "sal"}, "docs/results/salt.json: names recipe 'sal'"),
    ]
    for data, message in cases:
        (folder / "salt.json").write_text(json.dumps(data))
        with pytest.raises(ConfigError) as caught:
            load_results(tmp_path)
        assert str(caught.value).startswith(message) and "\n" not in str(caught.value)
    (folder / "salt.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"^docs/results/salt.json: not valid JSON"):
        load_results(tmp_path)


def test_a_recipe_without_a_results_file_is_refused_by_lock_naming_the_file(tmp_path):
    from effitrain.config.generated import expected

    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "wsd.md").write_text((DOCS / "recipes" / "wsd.md").read_text())
    with pytest.raises(ConfigError, match=r"^lock: recipe 'wsd' has no .*results/wsd\.json; write its paper claim"):
        expected(["wsd"], docs=tmp_path)
