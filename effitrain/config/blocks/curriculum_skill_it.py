"""``curriculum: skill_it``: Skill-It's online mixture over domains (Chen et al. 2023, arXiv 2307.14430)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from effitrain.config.rules import rule
from effitrain.registry import choices_text, param, register


@register("curriculum", "skill_it", builder="effitrain.curriculum.skill_it:build_skill_it",
          summary="Online mixture over domains: p ∝ prior·exp(eta·A·(sum of the last per-domain eval losses)), "
                  "updated every update_every steps (Skill-It, 2307.14430)")
@dataclass
class SkillItParams:
    eta: float = param(0.5, gt=0, help="step size of the multiplicative-weights update (the authors' LEGO and "
                                       "addition runs: 0.5; Natural Instructions: 0.2)")
    update_every: int = param(50, ge=1, help="optimizer steps between updates; a multiple of train.eval_every (the "
                                             "update reads that evaluation's per-domain losses)")
    window: int = param(3, ge=1, help="evaluations whose loss vectors are summed in the update (--mw_window)")
    graph: Literal["identity", "declared"] = param("identity", help="the skills graph A: identity (independent "
                                                   "skills) or the identity plus `edges`")
    edges: Optional[dict[str, dict[str, float]]] = param(None, help="A[i][j], how much training on domain i helps "
                                                         "domain j (graph=declared); a diagonal entry replaces its "
                                                         "1; e.g. 'curriculum.edges={docstrings: {code: 0.5}}'")
    prior: Optional[dict[str, float]] = param(None, help="relative prior weight per domain (missing: 1); null = "
                                                         "all 1 (the authors' default)")

    def named_domains(self, path: str) -> list[tuple[str, str]]:
        named = [(f"{path}.prior", d) for d in self.prior or {}]
        for i, row in (self.edges or {}).items():
            named += [(f"{path}.edges", i)] + [(f"{path}.edges.{i}", j) for j in row]
        return named


@rule("skill_it_updates_at_evaluations", "curriculum skill_it updates at evaluations: update_every must be a "
                                         "multiple of train.eval_every when an update falls inside the run")
def _skill_it_eval_every(spec, env) -> Optional[str]:
    block = spec.block("curriculum")
    if block.name != "skill_it":
        return None
    every, evals, steps = block.params.update_every, spec.train.eval_every, spec.train.max_steps
    if every < steps and (evals == 0 or every % evals):
        return (f"curriculum.update_every={every} needs an evaluation at each update, but train.eval_every={evals}; "
                f"set train.eval_every to a divisor of {every}")
    return None


@rule("skill_it_names_known_domains", "curriculum skill_it's edges and prior name domains of the data (checked "
                                      "before the run for the demo corpus or declared dataset.domains)")
def _skill_it_domains(spec, env) -> Optional[str]:
    block = spec.block("curriculum")
    if block.name != "skill_it":
        return None
    dataset = spec.block("dataset")
    domains = getattr(dataset.params, "domains", None)
    if domains is None and dataset.name == "demo":
        from effitrain.data.demo import DEMO_DOMAINS  # standard library only
        domains = list(DEMO_DOMAINS)
    if not domains:
        return None  # other sources: checked when the sampler is built, before the run directory exists
    edges, prior = block.params.edges or {}, block.params.prior or {}
    named = [("curriculum.edges", d) for src, row in edges.items() for d in (src, *row)]
    named += [("curriculum.prior", d) for d in prior]
    for key, name in named:
        if name not in domains:
            return f"{key}: domain '{name}' is not a domain of the data; valid: {choices_text(sorted(domains))}"
    return None
