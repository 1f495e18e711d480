"""Run one synthesis stage in a process of its own (the tests kill it with SIGKILL): ``python synthesis_job.py
JOB.json`` with ``{"stage_dir", "synthesis", "overrides"}``; prints the summary as JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def run(job: dict) -> dict:
    from effitrain.config.compose import compose_config
    from effitrain.config.stages import parse_stages, stage_config
    from effitrain.generation.synthesis import run_synthesis

    composed = compose_config(job["overrides"])
    stage = parse_stages([{"name": "synth", "synthesis": job["synthesis"]}])[0]
    run_cfg = stage_config(composed.cfg, stage, init_model=None, final_models={})
    return run_synthesis(stage, run_cfg, Path(job["stage_dir"]), final_models={}, say=print, label="synth")


if __name__ == "__main__":
    print(json.dumps(run(json.loads(Path(sys.argv[1]).read_text())), default=str))
