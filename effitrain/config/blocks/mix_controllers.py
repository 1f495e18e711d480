"""Controllers of ``objective: mixed`` (the ``mix_controller`` group): blocks that set the components' weights per
step from what the run measures, where a schedule cannot know them in advance (effitrain/objectives/
mix_controllers.py).  Each names the components it governs, checks them at ``effitrain check``, and states its rule
for ``effitrain plan``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from effitrain.registry import ConfigError, choices_text, param, register


def _component(components: list, name: str, objective: str, path: str, key: str) -> Any:
    found = {c.name: c for c in components}
    if name not in found:
        raise ConfigError(f"{path}.{key}: no component '{name}'; the components: {choices_text(found)}")
    c = found[name]
    if c.objective.name != objective:
        raise ConfigError(f"{path}.{key}: component '{name}' has objective {c.objective.name}; this controller needs "
                          f"objective {objective} there")
    return c


@register("mix_controller", "relift", builder="effitrain.objectives.mix_controllers:build_relift",
          summary="ReLIFT (2506.07527): GRPO on every question; the ones all of whose samples are wrong go to a "
                  "buffer with their reference solution, and a step of SFT on the buffer follows when it is full")
@dataclass
class ReLIFTParams:
    rl: str = param("rl", help="the grpo component")
    sft: str = param("sft", help="the sft component that trains on the buffer (data: buffer)")
    reward: str = param("exact_answer", help="the grpo reward that says a sample is right (> 0) or wrong (<= 0)")

    def check_components(self, components: list, path: str) -> None:
        rl = _component(components, self.rl, "grpo", path, "rl")
        sft = _component(components, self.sft, "sft", path, "sft")
        if sft.data != "buffer":
            raise ConfigError(f"{path}.sft: component '{self.sft}' must train on the failed questions (data: buffer), "
                              f"not on {sft.data!r}")
        if rl.data == "buffer":
            raise ConfigError(f"{path}.rl: component '{self.rl}' samples answers to the stage's prompts; give it data: "
                              f"stage")
        names = [b.name for b in rl.objective.params.reward_blocks]
        if self.reward not in names:
            raise ConfigError(f"{path}.reward: the grpo component '{self.rl}' has no reward '{self.reward}'; its "
                              f"rewards: {choices_text(names)}")

    def governs(self, components: list) -> list[str]:
        return [self.rl, self.sft]

    def plan_weight(self, component: str, step: int) -> str:
        """Known only at run time: 1 or 0, an SFT step following a full buffer (see rule())."""
        return "1|0 (run-time)" if component == self.rl else "0|1 (run-time)"

    def plan_marks(self, max_steps: int) -> dict[int, str]:
        return {}

    def rule(self) -> str:
        return (f"every question of a {self.rl} step whose samples all score {self.reward} <= 0 joins a buffer with "
                f"its reference answer (newest first); when the buffer holds one step's rows (micro_batch_size x "
                f"grad_accum), the next step is SFT on the newest of them ({self.sft} 1, {self.rl} 0) and the rest "
                f"stays; run-time: which steps are SFT steps depends on the samples")


@register("mix_controller", "sasr", builder="effitrain.objectives.mix_controllers:build_sasr",
          summary="SASR (2505.13026): SFT warm-up, then each step SFT with probability p = G / (G + gamma x "
                  "G_warmup) from the SFT gradient norm, else GRPO")
@dataclass
class SASRParams:
    sft: str = param("sft", help="the sft component (on demonstrations: data: stage or its own stream)")
    rl: str = param("rl", help="the grpo component")
    warmup_steps: int = param(10, ge=1, help="W: steps of SFT only; the SFT gradient norm of the last one is G_warmup")
    gamma: float = param(1.0, gt=0, help="gamma in p = G_last / (G_last + gamma x G_warmup): larger = fewer SFT steps")

    def check_components(self, components: list, path: str) -> None:
        sft = _component(components, self.sft, "sft", path, "sft")
        _component(components, self.rl, "grpo", path, "rl")
        if sft.data == "buffer":
            raise ConfigError(f"{path}.sft: component '{self.sft}' trains on demonstrations; give it data: stage or a "
                              f"stream of its own, e.g. {{format: chat}}")

    def governs(self, components: list) -> list[str]:
        return [self.sft, self.rl]

    def plan_weight(self, component: str, step: int) -> str:
        if step < self.warmup_steps:
            return "1" if component == self.sft else "0"
        return "1 w.p. p" if component == self.sft else "1 w.p. 1-p"

    def plan_marks(self, max_steps: int) -> dict[int, str]:
        return {self.warmup_steps: "sasr: adaptive SFT/GRPO steps start"} if self.warmup_steps < max_steps else {}

    def rule(self) -> str:
        return (f"steps 0..{self.warmup_steps - 1} are SFT; G_warmup = the SFT gradient norm (before clipping) of "
                f"the last of them; from then each step is SFT with probability p = G_last / (G_last + "
                f"{self.gamma:g} x G_warmup), G_last the gradient norm of the latest SFT step (a draw seeded by "
                f"(seed, step)), else GRPO; p is in (0, 1) and known only at run time")
