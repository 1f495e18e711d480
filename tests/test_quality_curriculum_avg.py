"""The quality_curriculum_avg recipe end to end on the tiny model: rows scored by a pool proxy on their decoded text
and trained in descending proxy loss (ascending quality), the final model the EMA of the last snapshots, and a run
resumed between two snapshots ending with exactly the same weights and losses."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

RUN = ["+recipe=quality_curriculum_avg", "curriculum.scorer.proxy_steps=10", "train.max_steps=8",
       "methods.checkpoint_average.count=3", "methods.checkpoint_average.every=1", "train.save_every=1",
       "train.keep_checkpoints=10"]


def final_weights(run_dir):
    from safetensors.torch import load_file
    return load_file(str(run_dir / "final_model" / "model.safetensors"))


def losses(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {x["step"]: x["loss"] for x in lines if "loss" in x}


def test_sorted_by_quality_averaged_and_resumed_between_snapshots(tmp_path, train_in_process, monkeypatch):
    # a cache of its own for the row scores only (the other workers of the session score rows too), the rest shared
    import os
    from pathlib import Path
    shared, own = Path(os.environ["EFFITRAIN_CACHE"]), tmp_path / "cache"
    own.mkdir()
    for kind in ("base_models", "datasets", "demo", "packed", "selection", "tokenizers"):
        (shared / kind).mkdir(exist_ok=True)
        (own / kind).symlink_to(shared / kind)
    monkeypatch.setenv("EFFITRAIN_CACHE", str(own))
    full = tmp_path / "full"
    summary = train_in_process(RUN, full)
    assert summary["finished"] and summary["steps"] == 8

    # the rows were scored by the pool proxy on their decoded text (one score per packed row, cached), and the
    # sampler hands them out highest proxy loss first, over a random subset of the run's size (8 steps x 4 rows),
    # so the run ends on the top of the order; one micro-batch of 4 rows per step
    from effitrain.paths import cache_dir
    cached = sorted(cache_dir("curriculum").glob("row-scores-*.npy"))
    assert len(cached) == 1
    scores = np.load(cached[0])
    assert scores.max() > scores.min()                        # the proxy tells rows apart
    state = torch.load(full / "checkpoints" / "step_00000001" / "state.pt", weights_only=False)
    assert len(scores) > 32 and state["sampler"]["num_rows"] == 32 and state["sampler"]["position"] == 1

    # the snapshots after steps 6, 7 and 8 are in the hook's state; the final model is their EMA (recipe's alpha), and
    # it differs from the last step's raw weights, which the step-7 checkpoint's average cannot be
    hooks = torch.load(full / "checkpoints" / "step_00000008" / "state.pt", weights_only=False)["hooks"]
    assert hooks["checkpoint_average"]["taken"] == [6, 7, 8]
    final = final_weights(full)
    average = hooks["checkpoint_average"]["average"]
    name = next(n for n in average if n.endswith("lm_head.weight") or n.endswith("embed_tokens.weight"))
    saved = {k.removeprefix("model."): v for k, v in final.items()}
    assert torch.equal(saved[name.removeprefix("model.")].float(), average[name])

    # resume from step 7 (two snapshots averaged): the same last batch, loss and final weights
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000008")
    shutil.rmtree(resumed / "final_model")
    summary = train_in_process([*RUN, "resume=auto"], resumed)
    assert summary["finished"] and summary["steps"] == 8
    assert losses(resumed) == losses(full)
    again = final_weights(resumed)
    assert again.keys() == final.keys() and all(torch.equal(again[k], final[k]) for k in final)


def test_under_zero2_the_exported_last_checkpoint_is_the_averaged_model(tmp_path, train_in_process):
    # ZeRO keeps an fp32 master copy that the checkpoint stores and `effitrain export` reads (zero_to_fp32): the
    # average must reach it too, not only the module's weights
    from effitrain.export import _state_dict

    run = tmp_path / "zero2"
    train_in_process(["+recipe=quality_curriculum_avg", "curriculum.scorer.proxy_steps=10", "parallelism=zero2",
                      "train.max_steps=4", "methods.checkpoint_average.count=2", "methods.checkpoint_average.every=1"],
                     run)
    exported = _state_dict(run / "checkpoints" / "step_00000004")
    final = final_weights(run)
    assert exported.keys() >= final.keys()
    assert all(torch.equal(exported[k].float(), final[k].float()) for k in final)
