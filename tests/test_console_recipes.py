"""Every shipped recipe, run the way a new user runs it: the console script, in a fresh process, on an empty
``EFFITRAIN_CACHE`` and an empty torch extensions folder.

The rest of the suite runs recipes in-process on the session's warm cache, where the cached base model, tokenizer
and selection proxies already exist; "+recipe=lora fails on a fresh cache" (its base model's run composed a config
inside the console script's running Hydra app) passed all of it.  Here the cold work happens once for the module --
the demo corpus, the base model of the fine-tuning recipes, the selection proxies -- and is shared by the recipes
after it, as on a user's machine.

The recipes run as one console sweep (``effitrain -m +recipe=a,b,...``: one process, each recipe a member with its
own run directory and exit status in ``sweep.json``), with one eval batch.  The recipes that need a GPU are refused
on this machine's CPU, in one line that says so.  The cold work of a fresh cache (a LQS scoring, proxies, the base
model) takes most of the half hour this costs on two cores, so this module is not part of ``make test``: it is
``make test-first-day``, a CI step of its own (``.ci/run``).  One fine-tuning recipe on an empty cache, alone in
its process, is in the suite: tests/test_first_day.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from effitrain.config.tree import RECIPE_GROUP, group_options

# not in `make test` (the suite's 30 minutes): CI runs it as a step of its own, `make test-first-day`
pytestmark = [pytest.mark.slow, pytest.mark.first_day]

EFFITRAIN = str(Path(sys.executable).parent / "effitrain")  # the console script `make` installs into .venv/bin
SHORT = ["train.max_steps=2", "train.eval_batches=1"]


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """An empty cache and torch extensions folder, and a working folder outside the repository."""
    root = tmp_path_factory.mktemp("fresh")
    env = {**os.environ, "EFFITRAIN_CACHE": str(root / "cache"), "TORCH_EXTENSIONS_DIR": str(root / "extensions"),
           "OMP_NUM_THREADS": "1"}
    for key in ("PYTHONPATH", "EFFITRAIN_VERBOSE", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    (root / "work").mkdir()
    return root, env


def _console(args: list[str], env: dict, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([EFFITRAIN, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _runnable_here() -> tuple[list[str], dict[str, str]]:
    """The recipes whose checks pass on this machine's CPU -- the rules a launch applies once it knows the device
    (effitrain.train._launch) included -- and the refusal of each one that does not."""
    from effitrain.config.compose import compose_config
    from effitrain.config.rules import Environment, check_rules
    from effitrain.config.spec import validate
    from effitrain.registry import ConfigError

    cpu = Environment(device_type="cpu", world_size=1, bf16_supported=True, fp8_supported=False)
    runnable, refused = [], {}
    for name in group_options(RECIPE_GROUP):
        composed = compose_config([f"+recipe={name}"])
        spec = validate(composed.cfg, composed.recipes, rules=False)
        try:
            for one in [spec, *spec.stage_specs]:
                check_rules(one, cpu)
        except ConfigError as exc:
            refused[name] = str(exc)
        else:
            runnable.append(name)
    return runnable, refused


def test_every_recipe_runs_from_the_console_script_on_a_fresh_cache(fresh):
    root, env = fresh
    runnable, refused = _runnable_here()
    # only a missing GPU may keep a shipped recipe from running here (coat's FP8, qlora's 4-bit kernels), and the
    # launch says so in one line
    assert set(refused) <= {"coat", "qlora"} and all("GPU" in why for why in refused.values()), refused
    for name in refused:
        result = _console([f"+recipe={name}", *SHORT, f"run_dir={name}"], env, root / "work", timeout=600)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, (name, result.stderr[-2000:])
        assert "GPU" in result.stderr and not (root / "work" / name).exists(), name

    sweep = root / "work" / "all"
    result = _console(["-m", f"+recipe={','.join(runnable)}", *SHORT, f"run_dir={sweep}"], env, root / "work",
                      timeout=3 * 3600)
    manifest = json.loads((sweep / "sweep.json").read_text())["members"]
    failed = {runnable[m["member"]]: m.get("message") or m["status"] for m in manifest if m["status"] != "finished"}
    assert not failed and result.returncode == 0, (failed, result.stderr[-3000:])
    assert len(manifest) == len(runnable)
    assert f"curves and table: effitrain report {sweep}" in result.stdout
    assert not (root / "extensions").exists() or not any((root / "extensions").rglob("*.so")), \
        "a one-process run compiled a torch extension"
