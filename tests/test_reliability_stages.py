"""Multi-stage recipes refuse a later stage's mistake before the first stage trains.

Every stage is validated against the model the stages before it will hand it (effitrain/config/stage_shapes.py):
a stack order past the layers, merge_adapters without an adapter, a seq_len past the inherited model's positions,
'@stage:' naming a sweep stage.  A refusal that can only come when a later stage launches no longer claims that
nothing changed, and ``overwrite=true`` replaces an old pipeline only once the new one has taken its first step.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import effitrain_cli
from effitrain.errors import RunFailed
from effitrain.registry import ConfigError
from test_reliability_inputs import assert_one_line_error, run_check, snapshot
from test_reliability_runs import snapshot as run_snapshot  # content hashes, the run's lock file left out

ONE_LAYER = "stages.0.model.num_layers=1"  # g_stack's small stage; the stacked stage has four copies of it


@pytest.mark.parametrize("overrides, expected", [
    (["+recipe=g_stack", "+stages.1.transform.order=[0,3]"],
     ["stages.stacked.transform.order", "source layer 3 does not exist", "stage 'small' has 1 layers"]),
    (["+recipe=moe_upcycle", "stages.1.transform.top_k=9"],
     ["stages.moe.transform.top_k", "9 is more than num_experts (8)"]),
    (["+recipe=g_stack", "~stages.1.transform.factor", "stages.1.transform.name=merge_adapters"],
     ["stages.stacked.transform", "merge_adapters", "has no adapter (peft=none)", "peft=lora"]),
    (["+recipe=g_stack", "~stages.1.transform.factor", "stages.1.transform.name=merge_adapters",
      "+stages.0.peft=prefix"], ["stages.stacked.transform", "a prefix adapter", "cannot be folded"]),
    (["+recipe=g_stack", "~stages.1.transform", "+stages.0.peft=prefix"],
     ["stages.stacked.init", "frozen base of a prefix adapter"]),
    (["+recipe=g_stack", "+stages.1.dataset.seq_len=4096"],
     ["stages.stacked", "dataset.seq_len=4096", "position limit of the final model of stage 'small'", "2048"]),
    (["+recipe=g_stack", "+stages.1.dataset.seq_len=2048"],   # data: continue needs the small stage's rows
     ["stages.stacked.data", "'continue' needs the data stream of stage 'small'", "dataset.seq_len is 2048 here and "
      "128 there", "data: fresh"]),
    (["+recipe=regmix", "stages.1.init=@stage:proxies"],
     ["stages.main.init", "'@stage:proxies' names a sweep stage, which leaves no model", "config_from: proxies"]),
    (["+recipe=g_stack", "stages.1.init=@stage:nope"],
     ["stages.stacked.init", "'@stage:nope' must name an earlier stage", "earlier stages: small"]),
    (["+recipe=g_stack", "stages.5.train.max_steps=3"],
     ["stages.5.train.max_steps: no such stage", "2 stages, counted from 0: stages.0 (small), stages.1 (stacked)"]),
    (["+recipe=g_stack", "+stages.5.train.max_steps=3"], ["stages.5.train.max_steps: no such stage"]),
    (["+recipe=g_stack", "stages.small.train.max_steps=3"], ["no such stage", "'small' is stages.0"]),
    (["stages.0.train.max_steps=3"], ["this configuration has no stages", "'train.max_steps=VALUE'"]),
])
def test_a_later_stages_mistake_is_one_line_at_check(overrides, expected, capsys):
    code, out, err = run_check(overrides, capsys)
    line = assert_one_line_error(code, out, err, *expected)
    assert "+stages.5=" not in line  # never suggests adding a stage past the list, which fails the same way


def test_what_the_stages_hand_each_other_is_accepted_when_it_fits(capsys):
    for overrides in (["+recipe=g_stack", "+stages.1.transform.order=[0,0]"],
                      ["+recipe=g_stack", "~stages.1.transform.factor", "stages.1.transform.name=merge_adapters",
                       "+stages.0.peft=lora"],
                      ["+recipe=g_stack", "+stages.1.dataset.seq_len=2048", "stages.1.data=fresh"],
                      ["+recipe=g_stack", "stages.1.train.max_steps=3"]):
        code, out, err = run_check(overrides, capsys)
        assert code == 0, f"{overrides}: {err}"


def _old_pipeline(run: Path) -> dict:
    """A finished pipeline folder, as effitrain marks it (its content is what must survive)."""
    (run / "stages" / "01-small" / "final_model").mkdir(parents=True)
    (run / ".effitrain-run").write_text(json.dumps({"created": 0, "by": "effitrain"}) + "\n")
    (run / "summary.json").write_text(json.dumps({"finished": True}))
    (run / "stages" / "01-small" / "final_model" / "model.safetensors").write_bytes(b"weights of the old pipeline")
    return snapshot(run)


def test_overwrite_of_a_pipeline_whose_later_stage_is_refused_changes_nothing(tmp_path):
    """Before, stage 1 trained, the old pipeline was deleted, and then stage 2 was refused with exit 2."""
    run = tmp_path / "run"
    before = _old_pipeline(run)
    result = effitrain_cli("+recipe=g_stack", "+stages.1.transform.order=[0,3]", "overwrite=true", f"run_dir={run}",
                           timeout=120)
    assert_one_line_error(result.returncode, result.stdout, result.stderr, "source layer 3 does not exist")
    assert snapshot(run) == before
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    assert "deepspeed" not in (result.stdout + result.stderr).lower()


# ------------------------------------------------------------------------------------------------ launch
TWO = "+stages=[{name: first, train: {max_steps: 3}}, {name: second, train: {max_steps: 3}}]"


def _fail_in_stage(monkeypatch, stage_dir_name: str, error: Exception, *, after_step: int = 0) -> None:
    """Make one stage fail as a launch-time refusal would (``after_step=0``: while its data is built, before the
    run directory is taken) or as a crash would (after that optimizer step)."""
    from effitrain import train as train_module
    from effitrain.engine.events import EventBus

    if after_step == 0:
        build = train_module._build_data

        def refused(spec, launch):
            if Path(spec.run_dir or "").name == stage_dir_name:
                raise error
            return build(spec, launch)

        monkeypatch.setattr(train_module, "_build_data", refused)
        return
    emit = EventBus.emit

    def crash(self, event, state):
        emit(self, event, state)
        if event == "step_end" and state.step == after_step and state.run_dir.name == stage_dir_name:
            raise error

    monkeypatch.setattr(EventBus, "emit", crash)


@pytest.mark.slow
def test_a_pipeline_replaces_the_one_it_overwrites_at_its_first_step(tmp_path, train_in_process, monkeypatch):
    """Refused before the new pipeline's first step: the old one comes back byte for byte.  Failed after it (here a
    crash in stage 1's second step): the new pipeline is kept, as a single run is; before, the new pipeline was
    deleted and the old put back, so its training was lost."""
    run = tmp_path / "run"
    _old_pipeline(run)
    before = run_snapshot(run)
    with monkeypatch.context() as patch:
        _fail_in_stage(patch, "01-first", ConfigError("dataset: refused at launch"))
        with pytest.raises(ConfigError, match="refused at launch"):
            train_in_process([TWO, "overwrite=true"], run)
    assert run_snapshot(run) == before and [p.name for p in tmp_path.iterdir()] == ["run"]

    with monkeypatch.context() as patch:
        _fail_in_stage(patch, "01-first", RuntimeError("injected crash"), after_step=2)
        with pytest.raises(RuntimeError, match="injected crash"):
            train_in_process([TWO, "overwrite=true"], run)
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # the old pipeline is gone, nothing left beside it
    assert not (run / "stages" / "01-small").exists()
    assert (run / "stages" / "01-first" / "metrics.jsonl").is_file()
    assert "injected crash" in json.loads((run / "summary.json").read_text())["failed"]


@pytest.mark.slow
def test_a_refusal_after_an_earlier_stage_trained_says_so_and_is_not_exit_2(tmp_path, train_in_process,
                                                                          monkeypatch):
    """A refusal found only when stage 2 launches (here injected where its data is built): stage 1 has trained, so
    'nothing was started or changed' (exit 2) would be false; it is a failure (exit 1) that names what was kept."""
    run = tmp_path / "run"
    _fail_in_stage(monkeypatch, "02-second", ConfigError("dataset.path: refused at launch"))
    with pytest.raises(RunFailed, match=r"stages.second: refused after stage\(s\) first trained \(kept in .*"
                                        r"stages\): dataset.path: refused at launch"):
        train_in_process([TWO], run)
    assert (run / "stages" / "01-first" / "final_model" / "config.json").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert not summary["finished"] and "refused after stage(s) first trained" in summary["failed"]
