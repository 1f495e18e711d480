"""scripts/bench_generation.py's wording: its times are called this machine's only when nothing else ran."""

from __future__ import annotations

import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import bench_generation  # noqa: E402  (scripts/ is not a package)


def test_the_load_decides_whether_the_times_are_the_machines_or_the_moments():
    idle = bench_generation.load_sentence("0.64 2.19 2.37", "0.78 2.17 2.36", 2)
    assert idle.startswith("Measured on an otherwise idle 2-CPU machine") and "under load" not in idle
    busy = bench_generation.load_sentence("3.10 2.90 2.50", "3.20 3.00 2.60", 2)
    assert busy.startswith("**Measured under load**") and "not the backends' speed" in busy


def test_each_backends_row_is_the_median_over_its_rounds_and_a_cache_miss_in_any_round_shows():
    runs = [{"requests": 4, "seconds": s, "requests_per_s": 4 / s, "tokens": 40, "tokens_per_s": 40 / s,
             "second_run_seconds": 0.001, "second_run_sent": 0, "second_run_cached": 4} for s in (2.0, 1.0, 4.0)]
    row = bench_generation.median_row(runs)
    assert row["seconds"] == 2.0 and row["seconds_range"] == "1.000–4.000" and row["requests_per_s"] == 2.0
    assert row["tokens_per_s"] == 20.0 and row["rounds"] == 3
    runs[1] = {**runs[1], "second_run_sent": 1, "second_run_cached": 3}
    assert (bench_generation.median_row(runs)["second_run_sent"], bench_generation.median_row(runs)["second_run_cached"]) == (1, 3)
