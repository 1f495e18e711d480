"""Ctrl-C and resume repeat the uninterrupted run exactly, for every recipe family that carries state beyond the
weights and Adam's moments: GaLore's subspace and its refresh counter, APOLLO's random projection, Adam-mini's
per-block moments, Muon's momentum buffers beside its AdamW part's moments, LISA's layer choice, low-rank refactorization and momentum resets, COSMOS's tracked eigenbasis, Skill-It's online mixture, sparse spectral training's rounds.  Every value
the run logs (loss, eval losses, lr, grad norm, mixture weights, switch and round counts) must be equal to the last
digit.  Ctrl-C is
sent as a terminal sends it (SIGINT to the running console command) between two log lines, so the resumed run
must also carry the log line it was in the middle of.  A pipeline stopped in its second stage resumes from a
relative path given in the folder the user works in."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, TINY, ctrl_c_after, effitrain_cli

pytestmark = pytest.mark.slow

# logged once per four steps; Ctrl-C once the step-4 line is written: the run stops a step or two later, inside
# the second window, between two refreshes / switches / mixture updates
RUN = [*TINY, "train.max_steps=14", "train.log_every=4", "optimizer.lr=3e-3"]
# Each run pairs an optimizer family with a method or curriculum family whose state lies elsewhere (the optimizer's
# per-parameter state vs a hook's or the sampler's), so four runs check eight families; COSMOS runs alone.
FAMILIES = {
    # GaLore: a new subspace every 3 steps (SVD of the gradient) and its refresh counters; Skill-It: the online
    # mixture's weights, updated from the per-domain eval losses every 4 steps
    "galore+skill_it": ["+recipe=[galore,skill_it]", "optimizer.refreshes_per_run=4", "train.eval_every=4",
                        "curriculum.update_every=4"],
    # APOLLO: a new random projection every 3 steps (seeded by its refresh count); LISA: the active layer, drawn
    # anew every 3 steps from the hook's generator (tiny_llama: not demo_base, whose base run is not the point)
    "apollo+lisa": ["+recipe=[apollo,lisa]", "optimizer.refreshes_per_run=4", "model=tiny_llama",
                    "methods.lisa.interval=3"],
    # Adam-mini: one second moment per block; sparse spectral training: a round (re-SVD, new draw) every 3 steps
    "adam_mini+sparse_spectral": ["+recipe=[adam_mini,sparse_spectral]", "methods.sparse_spectral.interval=3"],
    # Muon: a momentum buffer per hidden weight (torch.optim.Muon) and AdamW's moments for the rest, in one
    # optimizer whose inner optimizers must be re-linked to the loaded state on resume; low_rank_refresh: SLTrain's
    # B·A re-split into balanced factors and every moment dropped every 3 steps (its refresh count)
    "muon+low_rank_refresh": ["+recipe=muon", "peft=sltrain", "peft.rank=8",
                              "+methods.low_rank_refresh.interval=3"],
    # COSMOS: per hidden weight a momentum, a tracked eigenbasis and its Gram EMA, and the in-subspace second moment
    "cosmos": ["+recipe=cosmos", "optimizer.rank=8"],
}
NOT_REPEATABLE = {"tokens_per_s", "step_time_s", "peak_memory_bytes", "mfu"}  # the clock and the process, not the run


def logged(run_dir):
    """Every logged value that the run computes (losses, lr, grad norm, the methods' own values), by step."""
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {(l["step"], k): v for l in lines for k, v in l.items() if k not in NOT_REPEATABLE}


def start(args, cwd=REPO):
    return subprocess.Popen([sys.executable, "-m", "effitrain.cli", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def assert_repeats(expected, resumed, stop, last):
    assert set(resumed) == set(expected)
    later = [key for key in expected if key[0] > stop]
    assert any(key[0] == last for key in later)
    for key in sorted(later):
        assert resumed[key] == expected[key], (key, resumed[key], expected[key])   # to the last digit


@pytest.mark.parametrize("families", list(FAMILIES))
def test_ctrl_c_then_resume_repeats_the_uninterrupted_run(tmp_path, families):
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    reference = start([*RUN, *FAMILIES[families], f"run_dir={full}"])   # beside the stopped run: same machine
    result = ctrl_c_after([*RUN, *FAMILIES[families], f"run_dir={stopped}"], stopped / "metrics.jsonl", lines=1)
    out, err = reference.communicate(timeout=600)
    assert reference.returncode == 0, err[-2000:]
    assert result.returncode == 75, result.stderr[-2000:]
    assert f"continue with: effitrain resume {stopped}" in result.stdout
    stop = json.loads((stopped / "summary.json").read_text())["steps"]
    assert stop < 14, "the run finished before Ctrl-C reached it"

    resumed = effitrain_cli("resume", str(stopped))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"at step {stop}" in resumed.stdout
    assert_repeats(logged(full), logged(stopped), stop, last=14)


def test_a_pipeline_stopped_in_stage_two_resumes_from_a_relative_path(tmp_path):
    """`effitrain resume outputs/r2` in the folder the run was started from: the stages' stored model paths are
    the same paths spelled differently, and the Ctrl-C line names the pipeline's folder, not the stage's."""
    stages = "+stages=[{name: first, train: {max_steps: 4}}, {name: second, train: {max_steps: 14}}]"
    tiny = [o for o in RUN if not o.startswith("train.max_steps=")]  # it would shorten every stage
    args = [*tiny, stages]
    reference = start([*args, "run_dir=outputs/full"], cwd=tmp_path)
    second = tmp_path / "outputs" / "r2" / "stages" / "02-second"
    result = ctrl_c_after([*args, "run_dir=outputs/r2"], second / "metrics.jsonl", lines=1, cwd=tmp_path)
    out, err = reference.communicate(timeout=600)
    assert reference.returncode == 0, err[-2000:]
    assert result.returncode == 75, result.stderr[-2000:]
    assert f"continue with: effitrain resume {tmp_path / 'outputs' / 'r2'}\n" in result.stdout
    stop = json.loads((second / "summary.json").read_text())["steps"]
    assert stop < 14, "the run finished before Ctrl-C reached it"

    resumed = effitrain_cli("resume", "outputs/r2", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "stage 1/2 'first': finished before, not re-run" in resumed.stdout
    assert f"at step {stop}" in resumed.stdout
    assert_repeats(logged(tmp_path / "outputs" / "full" / "stages" / "02-second"), logged(second), stop, last=14)
    assert json.loads((tmp_path / "outputs" / "r2" / "summary.json").read_text())["finished"]
