"""Task evaluation with lm-evaluation-harness on the local task, from a run and from the `evaluate` verb; sample
generations at evaluation time."""

from __future__ import annotations

import json

import pytest

from conftest import effitrain_cli


def test_the_shipped_local_task_is_what_its_generator_writes():
    from effitrain.config.eval_tasks import TASKS_DIR, make_demo_arithmetic

    shipped = [json.loads(l) for l in (TASKS_DIR / "demo_arithmetic.jsonl").read_text().splitlines()]
    assert shipped == make_demo_arithmetic()
    assert all(len(r["choices"]) == 4 and r["choices"][r["label"]].strip().lstrip("-").isdigit() for r in shipped)
    for r in shipped:   # the labelled choice is the right answer
        a, op, b = r["context"].split("\n")[1].rstrip(" =").split(" ")
        assert int(r["choices"][r["label"]]) == (int(a) + int(b) if op == "+" else int(a) - int(b))


@pytest.mark.slow
def test_a_run_with_lm_eval_lands_the_task_results_in_its_summary(tmp_path, train_in_process):
    run = tmp_path / "run"
    summary = train_in_process(["eval=lm_eval", "eval.limit=20", "train.max_steps=2"], run)
    acc = summary["tasks"]["demo_arithmetic"]["acc"]
    assert 0.0 <= acc <= 1.0 and "acc_stderr" in summary["tasks"]["demo_arithmetic"]
    assert json.loads((run / "summary.json").read_text())["tasks"] == summary["tasks"]

    # the verb gives the same numbers for the same model folder, and exports a checkpoint first when given one
    result = effitrain_cli("evaluate", str(run / "final_model"), "eval.limit=20")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["demo_arithmetic"]["acc"] == pytest.approx(acc)
    result = effitrain_cli("evaluate", str(run), "eval.limit=20")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["demo_arithmetic"]["acc"] == pytest.approx(acc)


def test_an_unknown_task_is_refused_in_one_line(tmp_path):
    result = effitrain_cli("evaluate", str(tmp_path), "eval.tasks=[demo_arithmetc]")
    assert result.returncode == 2 and "demo_arithmetic" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_samples_are_generated_at_every_evaluation(tmp_path, train_in_process):
    run = tmp_path / "run"
    train_in_process(["+methods.samples.max_new_tokens=5", "train.max_steps=4", "train.eval_every=2"], run)
    lines = [json.loads(l) for l in (run / "samples.jsonl").read_text().splitlines()]
    assert sorted({l["step"] for l in lines}) == [0, 2, 4]
    assert len(lines) == 3 * 3 and all(isinstance(l["completion"], str) for l in lines)
