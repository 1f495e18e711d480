"""The distillation recipes end to end on the tiny model: ``kd_torchdistill``'s student (with a hint regressor, the
teacher being wider) stopped by SIGTERM and resumed gives the uninterrupted run's losses, the regressor coming back
from the checkpoint and staying out of the exported model; ``salt``'s KD stage follows the distillation weight of its
timeline across a SIGTERM and resume, runs no teacher once the weight is 0, and hands its model to the next-token
stage."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors import safe_open

from conftest import sigterm_after_step

pytestmark = pytest.mark.slow


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _stage_is(name):
    return lambda state: state.run_dir.name == name


KD_TORCHDISTILL = ["+recipe=kd_torchdistill", "stages.0.train.max_steps=2", "stages.1.train.max_steps=4",
                   "stages.0.model.hidden_size=128", "stages.0.model.num_layers=3",   # wider and deeper than 64 x 2
                   "stages.1.objective.hint.student_layer=1", "stages.1.objective.hint.teacher_layer=2",
                   "stages.1.objective.attention.pairs=[[1,2],[2,3]]",
                   "stages.1.objective.pkt.student_layer=2", "stages.1.objective.pkt.teacher_layer=3"]


def test_kd_torchdistill_resumes_its_regressor_exactly_and_exports_without_it(tmp_path, train_in_process):
    from effitrain.export import export_checkpoint

    full, stopped = tmp_path / "full", tmp_path / "stopped"
    assert train_in_process(KD_TORCHDISTILL, full)["finished"]
    with sigterm_after_step(2, when=_stage_is("02-student")):
        assert not train_in_process(KD_TORCHDISTILL, stopped)["finished"]
    checkpoint = stopped / "stages" / "02-student" / "checkpoints" / "step_00000002"
    state = torch.load(next((checkpoint / "ds").glob("mp_rank_*_model_states.pt")), weights_only=False)["module"]
    assert tuple(state["training_only.hint_regressor.weight"].shape) == (128, 64)  # student 64 -> teacher 128
    assert train_in_process([*KD_TORCHDISTILL, "resume=auto"], stopped)["finished"]

    expected = {m["step"]: m for m in _metrics(full / "stages" / "02-student") if "loss" in m}
    resumed = {m["step"]: m for m in _metrics(stopped / "stages" / "02-student") if "loss" in m}
    assert sorted(resumed) == sorted(expected) == [1, 2, 3, 4]
    for step in (3, 4):  # after the resume: the same student, regressor and batches
        for key in ("loss", "hint_loss", "at_loss", "pkt_loss", "soft_loss", "hard_loss"):
            assert resumed[step][key] == pytest.approx(expected[step][key], abs=1e-6), (step, key)
    assert all(m["hint_loss"] > 0 and m["at_loss"] > 0 and m["pkt_loss"] > 0 for m in expected.values())

    final = stopped / "stages" / "02-student" / "final_model" / "model.safetensors"
    with safe_open(str(final), "pt") as f:
        assert not [k for k in f.keys() if "training_only" in k]
    exported = export_checkpoint(checkpoint, tmp_path / "exported")  # the checkpoint's state without the regressor
    with safe_open(str(exported / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "training_only" in k]


SALT = ["+recipe=salt", "stages.0.train.max_steps=2", "stages.1.train.max_steps=4", "stages.2.train.max_steps=2",
        "stages.1.timeline.distill_weight.points=[{at: 0, value: 0.5}, {at: 2, value: 0.0}]"]


def test_salt_kd_stage_follows_its_weight_across_a_resume_then_hands_over_to_next_token_training(
        tmp_path, train_in_process):
    run = tmp_path / "salt"
    with sigterm_after_step(2, when=_stage_is("02-llm_kd")):
        assert not train_in_process(SALT, run)["finished"]
    summary = train_in_process([*SALT, "resume=auto"], run)
    assert summary["finished"] and [s["stage"] for s in summary["stages"]] == ["slm", "llm_kd", "llm"]

    kd = [m for m in _metrics(run / "stages" / "02-llm_kd") if "loss" in m]
    assert [m["step"] for m in kd] == [1, 2, 3, 4]
    assert [m["distill_weight"] for m in kd] == pytest.approx([0.5, 0.25, 0.0, 0.0])
    for m in kd:
        assert m["loss"] == pytest.approx(m["distill_weight"] * m["soft_loss"] +
                                          (1 - m["distill_weight"]) * m["hard_loss"], rel=1e-5)
    assert kd[0]["soft_loss"] > 0 and kd[2]["soft_loss"] == kd[3]["soft_loss"] == 0.0  # no teacher pass at 0

    config = yaml_config(run / "stages" / "02-llm_kd")
    assert config["selection"]["scorer"]["model_path"] == str(run / "stages" / "01-slm" / "final_model")
    assert config["selection"]["selector"] == {"name": "topk"}
    assert (config["selection"]["scorer"]["statistic"], config["selection"]["scorer"]["top_k"]) == ("topk_median", 10)
    llm = yaml_config(run / "stages" / "03-llm")
    assert llm["objective"]["name"] == "causal_lm" and llm["selection"]["name"] == "none"
    assert llm["model"]["path"] == str(run / "stages" / "02-llm_kd" / "final_model")  # the same LLM continues


def yaml_config(run_dir):
    return yaml.safe_load((run_dir / "config.yaml").read_text())
