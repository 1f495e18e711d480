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


def _scheduler_blocks(entries: list, path: str) -> list:
    """Each entry of a list of scheduler blocks (``{name: cosine, ...}``) validated against the scheduler group."""
    from effitrain.registry import REGISTRY

    if not entries:
        raise ConfigError(f"{path}: give at least one scheduler, e.g. [{{name: cosine}}]")
    return [REGISTRY.parse("scheduler", e, f"{path}[{i}]") for i, e in enumerate(entries)]


@register("sweep", "anneal_law", builder="effitrain.curriculum.anneal_law_sweep:build",
          summary="Scaling law with LR annealing: fit L = L0 + A*S1^-alpha - C*S2 to one or two runs' loss curves, "
                  "predict each candidate schedule's final loss, keep the best (Tissue et al., 2408.11029)")
@dataclass
class AnnealLawParams:
    #: the key its members train with and its conclusion sets
    CONCLUDES: ClassVar[tuple[str, ...]] = ("scheduler",)
    fit_schedulers: list[dict[str, Any]] = param(default_factory=lambda: [{"name": "constant", "warmup_steps": 20},
                                                          {"name": "cosine"}],
                                 help="the schedules of the fitted runs, one member run each (paper: one or two "
                                      "curves, e.g. constant and cosine)")
    candidates: list[dict[str, Any]] = param(default_factory=lambda: [{"name": "cosine"}, {"name": "wsd"},
                                                      {"name": "constant", "warmup_steps": 20}],
                             help="the schedules whose final loss the fitted law predicts; the lowest is concluded")
    predict_steps: Optional[int] = param(None, ge=1, help="the run length the candidates are predicted at "
                                         "(default: the stage's train.max_steps)")
    decay_factor: float = param(0.999, gt=0, lt=1, help="lambda, the decay of the annealing momentum (paper: 0.999)")
    huber_delta: float = param(1e-3, gt=0, help="delta of the Huber loss on log-loss residuals (paper: 1e-3)")
    fit_from: float = param(0.1, ge=0, lt=1, help="log lines before this fraction of the run are not fitted (the "
                            "first steps' loss is off the law; the authors fit from step 1000 of 20000)")

    def validate(self, path: str) -> None:
        _scheduler_blocks(self.fit_schedulers, f"{path}.fit_schedulers")
        _scheduler_blocks(self.candidates, f"{path}.candidates")
        for group, entries in (("fit_schedulers", self.fit_schedulers), ("candidates", self.candidates)):
            if any(e.get("name") == "timeline" for e in entries):
                raise ConfigError(f"{path}.{group}: the 'timeline' scheduler follows the run's timeline.lr, which "
                                  f"differs per stage; name a scheduler with its own curve (constant, cosine, wsd, "
                                  f"rewarm_cosine)")


def _stage_domains(spec: Any) -> Optional[list[str]]:
    """The stage's domains where they are known without reading data (a declared ``dataset.domains``, or the demo
    corpus's); None for other sources (checked when the sweep builds its members)."""
    dataset = spec.block("dataset")
    domains = getattr(dataset.params, "domains", None)
    if domains is None and dataset.name == "demo":
        from effitrain.data.demo import DEMO_DOMAINS  # standard library only
        domains = list(DEMO_DOMAINS)
    return None if domains is None else list(domains)


@register("sweep", "cmr_law", builder="effitrain.curriculum.cmr_law_sweep:build",
          summary="CMR scaling law: continual pre-training runs at several domain ratios, power laws of their loss "
                  "changes, the critical mixture ratio (Gu et al., 2407.17467)")
@dataclass
class CMRLawParams:
    #: the keys its members train with and its conclusion sets: the recipe's own values are stand-ins
    CONCLUDES: ClassVar[tuple[str, ...]] = ("curriculum", "timeline.mixture")
    domain: str = param("code", help="the new domain of the continual pre-training; the other domains of the data "
                        "are the replayed general corpus, in their token shares (paper: finance or academic papers)")
    ratios: list[float] = param(default_factory=lambda: [0.125, 0.25, 0.5, 0.75],
                                help="the domain ratios of the member runs (paper: 1/8, 1/4, 1/3, 1/2 and more)")
    tolerance: float = param(0.05, gt=0, help="how far the general loss may rise above its value at the start of "
                             "continual training (paper: 0.05)")
    budget_steps: Optional[int] = param(None, ge=1, help="the continual run's length the CMR is for, in this "
                                        "stage's steps (default: the stage's train.max_steps; longer: Eq. 8 "
                                        "extrapolates)")

    def named_domains(self, path: str) -> list[tuple[str, str]]:
        return [(f"{path}.domain", self.domain)]

    def check_stage(self, spec: Any, path: str) -> None:
        domains = _stage_domains(spec)
        if domains is not None and self.domain not in domains:
            raise ConfigError(f"{path}.domain: '{self.domain}' is not a domain of the stage's data"
                              f"{did_you_mean(self.domain, domains)}; valid: {choices_text(sorted(domains))}")
        if domains is not None and len(domains) < 2:
            raise ConfigError(f"{path}.domain: the stage's data has no other domain to replay as general data")

    def validate(self, path: str) -> None:
        if len(set(self.ratios)) < 2 or any(not 0 < r < 1 for r in self.ratios):
            raise ConfigError(f"{path}.ratios: give at least two distinct domain ratios strictly between 0 and 1, "
                              f"got {self.ratios}")


@register("sweep", "merge_ablation", builder="effitrain.curriculum.merge_ablation_sweep:build",
          summary="Data ablations by merging: one model per domain partition, each candidate mixture's perplexity "
                  "estimated by the mixture-weighted parameter average (Na et al., 2410.15661)")
@dataclass
class MergeAblationParams:
    #: the keys its members train with and its conclusion sets: the recipe's own values are stand-ins
    CONCLUDES: ClassVar[tuple[str, ...]] = ("curriculum", "timeline.mixture")
    target: str = param("all", help="the eval domain whose perplexity the mixture minimises, or 'all' for the "
                        "mean eval loss over every domain (paper: Paloma's domains and the partitions' own)")
    grid_step: float = param(0.25, gt=0, le=0.5, help="the candidate mixtures: every weighting of the partitions "
                             "in multiples of grid_step (0.25 and 4 domains: 35 candidates)")
    eval_rows: int = param(16, ge=1, help="held-out packed rows per eval domain each candidate is scored on")

    def named_domains(self, path: str) -> list[tuple[str, str]]:
        return [] if self.target == "all" else [(f"{path}.target", self.target)]

    def check_stage(self, spec: Any, path: str) -> None:
        domains = _stage_domains(spec)
        if domains is not None and self.target != "all" and self.target not in domains:
            raise ConfigError(f"{path}.target: '{self.target}' is not a domain of the stage's data"
                              f"{did_you_mean(self.target, domains)}; valid: "
                              f"{choices_text(['all', *sorted(domains)])}")

    def validate(self, path: str) -> None:
        units = round(1.0 / self.grid_step)
        if abs(units * self.grid_step - 1.0) > 1e-9:
            raise ConfigError(f"{path}.grid_step: {self.grid_step} does not divide 1 evenly; use 0.5, 0.25, 0.2, "
                              f"0.125 or 0.1")
