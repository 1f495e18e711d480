"""Sweep stages (``sweep:`` of a stage entry): a stage that trains many small member runs instead of one run, then
concludes with a config delta that later stages take with ``config_from: STAGE``.

A sweep builder is called as ``build(params)`` and returns an object with
``members(run_cfg, *, say) -> [(name, member run config), ...]`` (the stage's resolved run config in, one plain run
config per member out) and ``conclude(run_cfg, results, *, say) -> (delta, record)`` (``results``: one
``(name, member config, member summary)`` per member; ``delta``: the keys later stages merge; ``record``: what the
pipeline writes next to it for the reader).  Torch-free here; the builders live in their method's module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Optional

from effitrain.registry import ConfigError, choices_text, did_you_mean, param, register


@register("sweep", "regmix", builder="effitrain.curriculum.regmix_sweep:build",
          summary="RegMix: proxy runs on Dirichlet mixtures, a regression of their eval loss, the predicted-best "
                  "mixture (Liu et al., 2407.01492)")
@dataclass
class RegMixParams:
    #: the keys its members train with and its conclusion sets: the recipe's own values are stand-ins
    CONCLUDES: ClassVar[tuple[str, ...]] = ("curriculum", "timeline.mixture")
    num_proxies: int = param(16, ge=4, help="proxy runs, each with its own random mixture (paper: 512 for 17 "
                             "domains; the card scales it to 4 domains)")
    target: str = param("prose", help="the eval domain whose loss the mixture minimises, or 'all' for the mean "
                        "eval loss (paper: Pile-CC, the web text; here prose plays it)")
    regression: Literal["lightgbm", "linear"] = param("lightgbm", help="the paper's LightGBM, or linear regression")
    seed: Optional[int] = param(None, help="seed of the mixtures and the simulation (default: train.seed)")
    temperature: float = param(0.5, gt=0, le=1, help="the proxies' prior is prior**temperature (paper: 0.5)")
    min_strength: float = param(0.1, gt=0, help="smallest Dirichlet strength (paper: 0.1)")
    max_strength: float = param(5.0, gt=0, help="largest Dirichlet strength (paper: 5.0)")
    max_usage: float = param(15.0, gt=1, help="a domain weighs at most max_usage x its token share (paper: 15)")
    minimum: float = param(2e-4, gt=0, lt=0.1, help="smaller weights become 0; weights rounded to multiples "
                           "(paper: 2e-4)")
    num_samples: int = param(100000, ge=100, help="simulated mixtures scored by the regression (paper: 100,000)")
    top_k: int = param(128, ge=1, help="the predicted-best mixture is the mean of the top_k simulated ones "
                       "(paper: 128)")

    def named_domains(self, path: str) -> list[tuple[str, str]]:
        return [] if self.target == "all" else [(f"{path}.target", self.target)]

    def check_stage(self, spec: Any, path: str) -> None:
        """``target`` against the stage's domains where they are known without reading data (a declared
        ``dataset.domains``, or the demo corpus's); other sources are checked when the sweep builds its members."""
        dataset = spec.block("dataset")
        domains = getattr(dataset.params, "domains", None)
        if domains is None and dataset.name == "demo":
            from effitrain.data.demo import DEMO_DOMAINS  # standard library only
            domains = list(DEMO_DOMAINS)
        if domains is not None and self.target != "all" and self.target not in domains:
            raise ConfigError(f"{path}.target: '{self.target}' is not a domain of the stage's data"
                              f"{did_you_mean(self.target, list(domains))}; valid: "
                              f"{choices_text(['all', *sorted(domains)])}")

    def validate(self, path: str) -> None:
        if self.min_strength > self.max_strength:
            raise ConfigError(f"{path}.min_strength: {self.min_strength} is above max_strength {self.max_strength}")
        if self.top_k > self.num_samples:
            raise ConfigError(f"{path}.top_k: {self.top_k} is more than num_samples {self.num_samples}")
