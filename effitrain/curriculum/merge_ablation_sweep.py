"""``sweep: {name: merge_ablation}``: the stage that ranks data mixtures by merging partition models
(effitrain/curriculum/merge_ablation.py has the arithmetic).

``members``: one run per domain of the stage's data (the partitions), each the stage's run config (continued from
the stage's starting model, the paper's shared seed model) with a one-point mixture of that domain alone, keeping
its final model.  ``conclude``: every candidate mixture on the ``grid_step`` grid of the simplex is scored by the
mean token loss, on ``eval_rows`` held-out rows of the ``target`` domain(s), of the partition models' parameter
average weighted by the mixture; the one with the lowest perplexity becomes the delta
``{curriculum: {name: mixture}, timeline: {mixture: ...}}`` that a stage with ``config_from`` merges.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import numpy as np

from effitrain.curriculum import merge_ablation
from effitrain.curriculum.regmix_sweep import mixture_delta, token_distribution
from effitrain.registry import ConfigError, choices_text, did_you_mean


def build(params: Any) -> "MergeAblationSweep":
    return MergeAblationSweep(params)


def eval_rows(run_cfg: dict[str, Any], domains: list[str], limit: int) -> np.ndarray:
    """The first ``limit`` held-out packed rows of each of ``domains``, as the runs' evaluation reads them."""
    from datasets import DatasetDict

    from effitrain.config.spec import validate
    from effitrain.data.packing import to_numpy
    from effitrain.data.splits import build_packed_splits

    spec = validate(run_cfg)
    pool = spec.block("dataset").build()
    _, _, packed_eval = build_packed_splits(spec.block("dataset").params, spec.block("model").params,
                                            DatasetDict(train=pool["train"], eval=pool["eval"]),
                                            tokenizer_corpus=pool["train"])
    rows = [to_numpy(packed_eval[d])[:limit] for d in domains if d in packed_eval]
    if not rows or any(r.ndim != 2 for r in rows):
        raise ConfigError("sweep: merge_ablation scores packed text rows; the stage's dataset has no plain eval "
                          "rows for " + ", ".join(domains))
    return np.concatenate(rows)


class MergeAblationSweep:
    def __init__(self, params: Any) -> None:
        self.params = params
        self._domains: list[str] | None = None

    def domains(self, run_cfg: dict[str, Any]) -> list[str]:
        if self._domains is None:
            self._domains = sorted(d for d, w in token_distribution(run_cfg).items() if w > 0)
        return self._domains

    def members(self, run_cfg: dict[str, Any], *, say: Callable[[str], None]) -> list[tuple[str, dict[str, Any]]]:
        p = self.params
        domains = self.domains(run_cfg)
        if p.target != "all" and p.target not in domains:
            raise ConfigError(f"sweep.target: '{p.target}' is not a domain of the training data"
                              f"{did_you_mean(p.target, domains)}; valid: {choices_text(['all', *domains])}")
        say("merge_ablation: one model per partition: " + ", ".join(domains))
        members = []
        for domain in domains:
            cfg = copy.deepcopy(run_cfg)
            delta = mixture_delta([domain], np.array([1.0]))
            cfg["curriculum"] = delta["curriculum"]
            cfg["timeline"] = {k: v for k, v in (cfg.get("timeline") or {}).items() if k != "mixture"}
            cfg["timeline"]["mixture"] = delta["timeline"]["mixture"]
            cfg.setdefault("train", {})["save_final_model"] = True  # the partition models are what is merged
            members.append((f"partition-{domain}", cfg))
        return members

    def conclude(self, run_cfg: dict[str, Any], results: list[tuple[str, dict[str, Any], dict[str, Any]]], *,
                 say: Callable[[str], None]) -> tuple[dict[str, Any], dict[str, Any]]:
        from transformers import AutoModelForCausalLM

        p = self.params
        domains = self.domains(run_cfg)
        state_dicts, model = [], None
        for name, cfg, summary in results:
            folder = Path(summary.get("final_model") or Path(cfg["run_dir"]) / "final_model")
            try:
                loaded = AutoModelForCausalLM.from_pretrained(str(folder))
            except Exception as exc:  # transformers and safetensors raise their own kinds
                raise ConfigError(f"sweep: merge_ablation cannot load partition model {name} from {folder} "
                                  f"({type(exc).__name__})") from None
            state_dicts.append({k: v.detach().clone() for k, v in loaded.state_dict().items()})
            model = model or loaded
        candidates = merge_ablation.simplex_grid(len(domains), p.grid_step)
        rows = eval_rows(run_cfg, domains if p.target == "all" else [p.target], p.eval_rows)
        losses = merge_ablation.evaluate_candidates(model, state_dicts, candidates, rows)
        best = int(np.argmin(losses))
        delta = mixture_delta(domains, candidates[best])
        chosen = delta["timeline"]["mixture"]["points"][0]["value"]
        ppl = [merge_ablation.perplexity(x) for x in losses]
        say("merge_ablation: lowest merged perplexity " + ", ".join(f"{d} {w:.3f}" for d, w in chosen.items()) +
            f" ({ppl[best]:.2f} on {p.target}; {len(candidates)} candidates, {min(ppl):.2f}..{max(ppl):.2f})")
        record = {"method": "merge_ablation", "target": p.target, "domains": domains,
                  "partitions": [n for n, _, _ in results], "eval_rows": int(len(rows)),
                  "candidates": [{"mixture": dict(zip(domains, map(float, c))), "loss": round(x, 6),
                                  "perplexity": round(q, 4)} for c, x, q in zip(candidates, losses, ppl)],
                  "chosen": {"mixture": dict(chosen), "perplexity": round(ppl[best], 4)}}  # a copy: no YAML alias
        return delta, record
