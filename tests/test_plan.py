"""`effitrain plan`: the timeline as rows (hand-computed values at every breakpoint), printed and plotted by a verb
that imports neither torch nor deepspeed and answers in under a second."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO, effitrain_cli
from effitrain.config.compose import compose_config
from effitrain.plan import plan_rows

BASE = {"prose": 0.4, "docstrings": 0.3, "code": 0.2, "arithmetic": 0.1}
UPSAMPLED = {"prose": 0.2, "docstrings": 0.15, "code": 0.4, "arithmetic": 0.25}


def test_domain_upsampling_plan_lists_the_switch_and_the_schedule_breakpoints():
    composed = compose_config(["+recipe=domain_upsampling"])
    rows = plan_rows(composed.cfg, composed.recipes)
    # 200 steps of 8 rows x 128 tokens = 1024 tokens per step; cosine warmup of 20 steps to lr 3e-3
    assert [r["step"] for r in rows] == [0, 20, 160, 199]
    assert [r["tokens"] for r in rows] == [0, 20 * 1024, 160 * 1024, 199 * 1024]
    assert [r["fraction"] for r in rows] == [0.0, 0.1, 0.8, 0.995]
    assert [r["mixture"] for r in rows] == [BASE, BASE, UPSAMPLED, UPSAMPLED]
    assert [r["phase"] for r in rows] == ["base_mix", "base_mix", "upsampled", "upsampled"]
    assert rows[0]["lr"] == pytest.approx(3e-3 / 20)  # (step + 1) / warmup_steps of the peak
    assert rows[1]["lr"] == pytest.approx(3e-3)
    assert all(r["seq_len"] == 128 for r in rows)
    assert "mixture" in rows[2]["what"] and "phase upsampled starts" in rows[2]["what"]


def test_plan_follows_overrides_and_every_declared_quantity():
    composed = compose_config([
        "scheduler=timeline", "train.max_steps=100", "train.micro_batch_size=4", "dataset.seq_len=64",
        "optimizer.lr=0.01",
        "+timeline.lr={unit: tokens, interpolate: linear, points: [{at: 0, value: 0.0}, {at: 2560, value: 1.0}]}",
        "+timeline.seq_len={unit: fraction, points: [{at: 0, value: 16}, {at: 0.25, value: 64}]}",
    ])
    rows = plan_rows(composed.cfg, composed.recipes)
    by_step = {r["step"]: r for r in rows}
    assert sorted(by_step) == [0, 10, 25, 99]        # 2560 tokens / (4 x 64 per step) = step 10; 0.25 x 100 = 25
    assert by_step[0]["lr"] == 0.0 and by_step[10]["lr"] == pytest.approx(0.01) and by_step[99]["lr"] == 0.01
    assert [by_step[s]["seq_len"] for s in (0, 10, 25, 99)] == [16, 16, 64, 64]
    assert all(r["mixture"] is None and r["phase"] is None for r in rows)


def test_plan_is_torch_free_and_answers_in_under_a_second():
    # CPU time (other processes on a shared machine do not count) of a first call in a fresh interpreter, which
    # pays for importing Hydra and the block schemas (about 0.9 s on the 2-core CI machine under load, the same as
    # `effitrain check`), and of a second call: the plan's own work.
    code = ("import sys, time; from effitrain.cli import main; t = time.process_time(); "
            "code = main(['plan', '+recipe=domain_upsampling']); cold = time.process_time() - t; "
            "t = time.process_time(); main(['plan', '+recipe=domain_upsampling']); warm = time.process_time() - t; "
            "heavy = [m for m in ('torch', 'deepspeed', 'transformers', 'datasets', 'matplotlib') "
            "if m in sys.modules]; print('RESULT', code, heavy, round(cold, 3), round(warm, 3))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    result = out.stdout.split("RESULT ")[-1].split()
    assert result[:2] == ["0", "[]"], out.stdout + out.stderr
    cold, warm = float(result[2]), float(result[3])
    assert cold < 2.0 and warm < 0.5, (cold, warm)
    lines = out.stdout.split("RESULT")[0].splitlines()
    assert lines[0] == "domain_upsampling: 200 steps x 1,024 tokens (world size 1, packed rows of 128 tokens)"
    assert lines[1].split() == ["step", "tokens", "fraction", "lr", "seq_len", "w[arithmetic]", "w[code]",
                                "w[docstrings]", "w[prose]", "phase", "what"]
    assert lines[5].split()[:9] == ["160", "163,840", "0.800", "0.000616", "128", "0.25", "0.4", "0.15", "0.2"]
    assert "phases: base_mix [0, 160); upsampled [160, 200)" in out.stdout


def test_plot_writes_a_png_with_one_panel_per_quantity(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "plan.png"
    result = effitrain_cli("plan", "+recipe=domain_upsampling", "--plot", str(out), timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(f"wrote {out}")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (800, 720)  # 8 x (3 panels x 2.4) inches at 100 dpi: lr, seq_len, mixture


def test_plan_refuses_bad_input_in_one_line():
    result = effitrain_cli("plan", "--plot", "plan.svg", timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "effitrain: error: plan: --plot needs a file name ending in .png, e.g. --plot plan.png"


def test_a_multi_stage_recipe_has_one_section_per_stage():
    composed = compose_config(["+recipe=g_stack"])
    rows = plan_rows(composed.cfg, composed.recipes)
    small, stacked = "stage 1 'small' (init scratch)", "stage 2 'stacked' (init previous, transform stack_layers)"
    # each stage is a run of its own: steps and tokens count from its start, its cosine spans its own max_steps
    assert [(r["section"], r["step"]) for r in rows] == [(small, 0), (small, 20), (small, 49),
                                                         (stacked, 0), (stacked, 20), (stacked, 199)]
    assert rows[2]["fraction"] == 49 / 50 and rows[5]["fraction"] == 199 / 200
    assert rows[1]["lr"] == pytest.approx(3e-3) and rows[4]["lr"] == pytest.approx(3e-3)
    result = effitrain_cli("plan", "+recipe=g_stack", timeout=120)
    assert result.returncode == 0, result.stderr
    headers = [line for line in result.stdout.splitlines() if line.startswith("stage ")]
    assert headers == [f"{small}: 50 steps x 1,024 tokens (world size 1, packed rows of 128 tokens)",
                       f"{stacked}: 200 steps x 1,024 tokens (world size 1, packed rows of 128 tokens)"]
