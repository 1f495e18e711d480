"""Data ablations by merging: the candidate grid, the weighted parameter average by hand, and the sweep stage
scoring every candidate by its merged model and concluding the mixture with the lowest perplexity (tiny models
saved with save_pretrained as the partition runs' final models: no training).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from effitrain.config.compose import compose_config
from effitrain.config.spec import parse_sweep, validate
from effitrain.config.stages import stage_config
from effitrain.curriculum import merge_ablation, merge_ablation_sweep
from effitrain.objectives.common import mean_token_loss
from effitrain.registry import ConfigError


def test_simplex_grid_is_every_weighting_on_the_grid():
    grid = merge_ablation.simplex_grid(3, 0.5)
    assert sorted(map(tuple, grid)) == sorted([(1, 0, 0), (0, 1, 0), (0, 0, 1), (0.5, 0.5, 0), (0.5, 0, 0.5),
                                               (0, 0.5, 0.5)])
    assert len(merge_ablation.simplex_grid(4, 0.25)) == 35          # C(4 + 3, 3)
    with pytest.raises(ValueError, match="divide 1 evenly"):
        merge_ablation.simplex_grid(3, 0.3)


def test_the_merged_state_dict_is_the_weighted_average_by_hand():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0, 4.0], dtype=torch.bfloat16), "n": torch.tensor([3])}
    b = {"w": torch.tensor([5.0, -2.0]), "b": torch.tensor([8.0, 0.0], dtype=torch.bfloat16), "n": torch.tensor([3])}
    merged = merge_ablation.merged_state_dict([a, b], [1.0, 3.0])            # renormalised: 0.25, 0.75
    assert merged["w"].tolist() == [0.25 * 1 + 0.75 * 5, 0.25 * 2 + 0.75 * -2]
    assert merged["b"].dtype == torch.bfloat16 and merged["b"].tolist() == [6.0, 1.0]
    assert merged["n"].tolist() == [3]                                       # an integer buffer is not averaged
    with pytest.raises(ValueError, match="other parameters"):
        merge_ablation.merged_state_dict([a, {"w": a["w"]}], [1, 1])


def _tiny_models(tmp_path, n):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    folders = []
    for i in range(n):
        torch.manual_seed(i)
        model = LlamaForCausalLM(config)
        folder = tmp_path / f"m{i}"
        model.save_pretrained(folder)
        folders.append(folder)
    return config, folders


def _loss_by_hand(config, models, weights, rows):
    """A fresh model whose every parameter is sum_i w_i * p_i, evaluated on the rows."""
    from transformers import LlamaForCausalLM

    fresh = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in fresh.named_parameters():
            param.copy_(sum(w * dict(m.named_parameters())[name] for w, m in zip(weights, models)))
        ids = torch.from_numpy(rows).long()
        return float(mean_token_loss(fresh(input_ids=ids).logits, ids))


def test_the_sweep_concludes_the_mixture_whose_merged_model_has_the_lowest_perplexity(tmp_path, monkeypatch):
    domains = ["code", "prose", "arithmetic"]
    # which domains the data has, and its eval rows, come from the data (tested elsewhere); fixed here
    monkeypatch.setattr(merge_ablation_sweep, "token_distribution", lambda cfg: {d: 1 / 3 for d in domains})
    rows = np.random.default_rng(0).integers(0, 64, size=(6, 12))
    monkeypatch.setattr(merge_ablation_sweep, "eval_rows", lambda cfg, ds, limit: rows)
    cfg = compose_config(["+recipe=merge_ablation", "stages.1.sweep.grid_step=0.5"]).cfg
    spec = validate(cfg)
    run_cfg = stage_config(cfg, spec.stages[1], init_model="/nonexistent/seed", final_models={}, concluded={})
    sweep = parse_sweep(spec.stages[1]).build()
    members = sweep.members(run_cfg, say=lambda _: None)
    assert [m[0] for m in members] == ["partition-arithmetic", "partition-code", "partition-prose"]
    assert members[1][1]["timeline"]["mixture"]["points"][0]["value"] == {"code": 1.0}
    assert all(m[1]["train"]["save_final_model"] for m in members)

    config, folders = _tiny_models(tmp_path, 3)
    results = [(name, {**member, "run_dir": str(tmp_path / name)}, {"finished": True, "final_model": str(folder)})
               for (name, member), folder in zip(members, folders)]
    delta, record = sweep.conclude(run_cfg, results, say=lambda _: None)
    from transformers import LlamaForCausalLM
    models = [LlamaForCausalLM.from_pretrained(f) for f in folders]
    by_hand = {tuple(c["mixture"][d] for d in sorted(domains)):
               _loss_by_hand(config, models, [c["mixture"][d] for d in sorted(domains)], rows)
               for c in record["candidates"]}
    assert len(by_hand) == 6
    assert [c["loss"] for c in record["candidates"]] == pytest.approx(list(by_hand.values()), abs=1e-4)
    best = min(by_hand, key=by_hand.get)
    chosen = delta["timeline"]["mixture"]["points"][0]["value"]
    assert tuple(chosen.get(d, 0.0) for d in sorted(domains)) == pytest.approx(best)
    # the merged models differ (a mixture of random models is not any one of them): the choice is not a tie
    assert len({round(v, 4) for v in by_hand.values()}) == 6


@pytest.mark.parametrize("override, message", [
    ("stages.1.sweep.grid_step=0.3", "stages.partitions.sweep.grid_step: 0.3 does not divide 1 evenly"),
    ("stages.1.sweep.target=pros", "stages.partitions.sweep.target: 'pros' is not a domain of the stage's data "
                                   "(did you mean 'prose'?)"),
])
def test_bad_sweep_settings_are_refused_at_check_time(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(compose_config(["+recipe=merge_ablation", override]).cfg)
