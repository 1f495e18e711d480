"""``curriculum: dump``: DUMP's UCB sampler over data distributions (Wang et al. 2025, arXiv 2504.09710)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from effitrain.config.rules import rule
from effitrain.registry import param, register


@register("curriculum", "dump", builder="effitrain.curriculum.dump:build_dump",
          summary="RL prompts drawn by domain with p = softmax(UCB / temperature), UCB = the domain's recent mean "
                  "|advantage| + an exploration bonus, updated every step (DUMP, 2504.09710); objective=grpo")
@dataclass
class DumpParams:
    window: int = param(300, ge=1, help="completions per distribution whose mean |advantage| scores it (the "
                                        "authors' window_size, 300)")
    exploration: float = param(1.0, ge=0, help="weight of the bonus sqrt(2 ln(N+1) / (n_j+1)) (the authors' 1.0)")
    temperature: float = param(0.1, gt=0, help="softmax temperature over the UCB scores (the authors' 0.1)")


@rule("dump_needs_grpo_and_domains", "curriculum dump scores data distributions by the advantages of sampled "
                                     "completions: it needs objective=grpo and, on chat_demo, dataset.domain_by")
def _dump_needs_grpo(spec, env) -> Optional[str]:
    if spec.block("curriculum").name != "dump":
        return None
    objective = spec.block("objective").name
    if objective != "grpo":
        return (f"curriculum=dump reads the advantages of sampled completions, which objective={objective} does not "
                f"produce; use objective=grpo (with dataset.format=prompts)")
    dataset = spec.block("dataset")
    if dataset.name == "chat_demo" and dataset.params.domain_by == "one":  # other sources: when the sampler is built
        return ("curriculum=dump chooses between data distributions, but dataset.domain_by=one gives the built-in "
                "questions one domain; set dataset.domain_by=operation, digits or operation_digits")
    return None
