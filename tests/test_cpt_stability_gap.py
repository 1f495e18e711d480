"""cpt_stability_gap: pretrain on general data, then several epochs of a high-quality subset of the new domain mixed
with replay of the general data, then a short domain fine-tune.

What holds: the three stages resolve to the runs the card describes (the CPT stage re-warms the LR exactly as
``cpt_rewarm`` does); ``selection.domains`` selects among the new domain only and keeps every general document;
the CPT stage's mixture sampler goes through the subset several times without repeating a row before the subset
has been seen whole, and resumes to the same batches.
"""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import yaml

from effitrain.config.compose import compose_config
from effitrain.config.tree import config_root
from effitrain.config.spec import validate
from effitrain.curriculum.mixture import MixtureSampler
from effitrain.registry import REGISTRY, ConfigError


def _spec(*overrides):
    composed = compose_config(["+recipe=cpt_stability_gap", *overrides])
    return validate(composed.cfg, composed.recipes)


def test_the_stages_are_pretrain_then_subset_cpt_with_replay_then_domain_finetune():
    spec = _spec()
    assert [s.name for s in spec.stages] == ["pretrain", "cpt", "finetune"]
    pretrain, cpt, finetune = spec.stage_specs
    assert pretrain.block("dataset").params.domains == ["prose", "docstrings", "arithmetic"]
    assert pretrain.block("model").name == "llama"                     # from scratch (the tiny_llama option)
    assert cpt.block("model").name == "pretrained" and "pretrain" in cpt.block("model").params.path
    selection = cpt.block("selection")
    assert selection.name == "quality_classifier" and selection.params.domains == ["code"]
    assert selection.params.target.domain == "code" and selection.params.budget.fraction == 0.1
    assert cpt.block("dataset").params.domains is None and cpt.block("curriculum").name == "mixture"
    weights = cpt.timeline.resolve(max_steps=cpt.train.max_steps, tokens_per_step=1024).value("mixture", 0)
    assert weights["code"] == 0.5 and sum(weights.values()) == pytest.approx(1.0, abs=1e-9)
    # the CPT stage re-warms and re-decays exactly as the cpt_rewarm recipe does
    rewarm = yaml.safe_load((config_root() / "recipe" / "cpt_rewarm.yaml").read_text())
    assert cpt.block("scheduler").name == "rewarm_cosine"
    for key, value in rewarm["scheduler"].items():
        assert getattr(cpt.block("scheduler").params, key) == value
    assert cpt.block("optimizer").params.lr == rewarm["optimizer"]["lr"]
    assert finetune.block("dataset").params.domains == ["code"] and finetune.block("optimizer").params.lr == 1e-4


def _pool(n_new=40, n_general=30):
    texts = [f"def f{i}(x): return x + {i}" for i in range(n_new)] + \
            [f"The river {i} runs to the sea." for i in range(n_general)]
    domains = ["code"] * n_new + ["prose"] * n_general
    return datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"id": [f"d{i}" for i in range(len(texts))], "text": texts,
                                          "domain": domains}),
        eval=datasets.Dataset.from_dict({"id": ["e"], "text": ["x"], "domain": ["prose"]}))


def test_selection_domains_select_within_the_new_domain_and_keep_every_general_document(tmp_path):
    block = {"name": "random", "domains": ["code"], "budget": {"fraction": 0.25, "unit": "examples"}}
    sel = REGISTRY.parse("selection", block, "selection").build(_pool(), cache_dir=str(tmp_path), seed=0)
    domains = np.asarray(sel.train["domain"])
    assert (domains == "code").sum() == 10               # round(0.25 x 40): the budget counts the code documents
    assert (domains == "prose").sum() == 30              # all general documents, no budget spent on them
    assert sel.info["kept_domains"] == {"code": 10, "prose": 30}
    whole = REGISTRY.parse("selection", {**block, "domains": None}, "selection").build(
        _pool(), cache_dir=str(tmp_path), seed=0)
    assert len(whole.train) == round(0.25 * 70)           # without domains: a quarter of the whole pool
    with pytest.raises(ConfigError, match="selection.domains: 'maths' has no candidate documents; the pool's "
                                          "domains: code, prose"):
        REGISTRY.parse("selection", {**block, "domains": ["maths"]}, "selection").build(
            _pool(), cache_dir=str(tmp_path), seed=0)


def _cpt_sampler(rows: dict[str, int]):
    """The CPT stage's sampler over a packed set with ``rows`` rows per domain, as the run builds it."""
    spec = _spec().stage_specs[1]
    timeline = spec.timeline.resolve(max_steps=spec.train.max_steps, tokens_per_step=8 * 128)
    labels = np.concatenate([[d] * n for d, n in sorted(rows.items())])
    return MixtureSampler(labels, timeline, seed=0, micro_batch_size=spec.train.micro_batch_size,
                          grad_accum=1, world_size=1, rank=0), labels, spec.train.max_steps


def test_the_cpt_stage_sees_the_subset_several_times_and_no_row_twice_before_all_once():
    rows = {"arithmetic": 2051, "code": 475, "docstrings": 1092, "prose": 816}   # scripts/cpt_stability_gap_data.py
    sampler, labels, steps = _cpt_sampler(rows)
    it = iter(sampler)
    seen = np.concatenate([next(it) for _ in range(steps)])
    code = seen[labels[seen] == "code"]
    share = len(code) / len(seen)
    assert share == pytest.approx(0.5, abs=3 * np.sqrt(0.25 / len(seen)))   # the declared half, within 3 s.e.
    counts = np.bincount(code - np.flatnonzero(labels == "code")[0], minlength=rows["code"])
    assert counts.min() >= 3 and counts.max() - counts.min() <= 1      # ~4 epochs, every row as often (+-1)
    first_pass = code[:rows["code"]]
    assert len(set(first_pass.tolist())) == rows["code"]                 # no repeat before the subset is whole


def test_the_cpt_sampler_resumes_to_the_same_batches():
    rows = {"arithmetic": 200, "code": 50, "docstrings": 100, "prose": 80}
    sampler, _, _ = _cpt_sampler(rows)
    it = iter(sampler)
    for _ in range(37):
        next(it)
    state = sampler.state_dict()
    expected = [next(it) for _ in range(30)]
    resumed, _, _ = _cpt_sampler(rows)
    resumed.load_state_dict(state)
    it2 = iter(resumed)
    assert [next(it2) for _ in range(30)] == expected
