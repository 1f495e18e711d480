"""scripts/bench_gpu.py on a CPU with the tiny model: bf16 is measured, fp8 shows effitrain's refusal, and the
marked section replaces nothing else in the markdown file."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_gpu_tiny_measures_bf16_and_shows_the_fp8_refusal(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nkept\n\n<!-- bench_gpu:start -->\nold\n<!-- bench_gpu:end -->\n\nkept too\n")
    out = subprocess.run([sys.executable, "scripts/bench_gpu.py", "--tiny", "--steps", "4", "--warmup", "1",
                          "--repeats", "1", "--only", "bf16", "--only", "fp8", "--write", str(doc)],
                         capture_output=True, text=True, cwd=REPO, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nkept\n\n<!-- bench_gpu:start -->") and text.endswith("kept too\n")
    assert "old" not in text
    bf16 = re.search(r"^\| bf16 \| (\d+) \| 1\.000 \| n/a \(no GPU\) \| [\d.]+ GiB process RSS \| (\d+) \|$", text, re.M)
    assert bf16 and int(bf16.group(1)) == int(bf16.group(2)) > 0  # one round: the median is that run
    assert re.search(r"^\| fp8 \| refused here: incompatible configuration \[fp8_needs_sm89\]: precision=fp8 needs "
                     r"a CUDA GPU", text, re.M)
    assert "Not yet run on a GPU" in text and "--tiny --steps 4 --warmup 1 --repeats 1" in text
