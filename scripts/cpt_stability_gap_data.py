#!/usr/bin/env python
"""The data of the ``cpt_stability_gap`` recipe, stage by stage: packed training rows per domain, each domain's
token share, and for a stage with a mixture how many epochs of each domain its steps draw.

The recipe card's figures (the pretraining stage's shares that the CPT stage's replay keeps, the size of the
high-quality code subset and its epochs) come from this script:

    python scripts/cpt_stability_gap_data.py                    # the recipe as it ships
    python scripts/cpt_stability_gap_data.py stages.1.selection.budget.fraction=0.2

It builds data only (demo corpus, the quality-classifier selection, tokenizer, packing; all cached), no model.
Extra ``key=value`` arguments are Hydra overrides of the recipe.
"""

from __future__ import annotations

import sys

from effitrain.config.compose import compose_config
from effitrain.config.spec import validate
from effitrain.config.stages import placeholder_paths, stage_config
from effitrain.curriculum.regmix_sweep import domain_rows


def main(overrides: list[str]) -> None:
    composed = compose_config(["+recipe=cpt_stability_gap", *overrides])
    cfg = composed.cfg
    spec = validate(cfg, composed.recipes)
    init_models, final_models = placeholder_paths(spec.stages)
    for stage, stage_spec in zip(spec.stages, spec.stage_specs):
        run_cfg = stage_config(cfg, stage, init_model=init_models.get(stage.name), final_models=final_models)
        if stage.inherits_model:  # the data does not depend on the weights: count it with the scratch model block
            run_cfg["model"] = dict(cfg["model"])
        rows = domain_rows(run_cfg)
        total = sum(rows.values())
        t = stage_spec.train
        drawn = t.max_steps * t.micro_batch_size * t.grad_accum  # rows one process trains on
        points = ((run_cfg.get("timeline") or {}).get("mixture") or {}).get("points") or [{}]
        mixture = points[0].get("value") if stage_spec.block("curriculum").name == "mixture" else None
        print(f"stage {stage.index} '{stage.name}': {total} packed rows, {t.max_steps} steps x "
              f"{t.micro_batch_size * t.grad_accum} rows = {drawn} rows drawn")
        for d in sorted(rows):
            share = rows[d] / total
            weight = mixture.get(d, 0.0) if mixture else share
            epochs = drawn * weight / rows[d]
            print(f"  {d:<11} rows {rows[d]:>6}  token share {share:.4f}  weight {weight:.4f}  epochs {epochs:.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
