"""``dataset.control_tokens``: conditional training (Korbak et al. 2023, "Pretraining Language Models with Human
Preferences", 2302.08582).  Every segment of a training document gets a control token, ``<|good|>`` or ``<|bad|>``,
from a scorer's rating against a threshold; the tokens are added to the tokenizer as special tokens.  Torch-free:
the parameters only (the mechanism is effitrain/data/conditional.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from effitrain.registry import ConfigError, param


@dataclass
class ControlTokensParams:
    scorer: dict[str, Any] = field(default_factory=lambda: {"name": "perplexity"},
                                   metadata={"help": "a target-free selection scorer block rating each segment "
                                                     "(default: perplexity, a pool proxy's loss)"})
    good_when: Literal["low", "high"] = param("low", help="which scores are good: low (a loss, the authors' "
                                                          "toxicity/PII/PEP8 scores) or high (a quality score)")
    threshold: Optional[float] = param(None, help="a fixed score: at most (good_when low) or at least (high) is "
                                                  "good, as the authors' configs (toxicity 0.00056, PII and PEP8 0)")
    bad_fraction: Optional[float] = param(0.95, gt=0, lt=1, help="without a threshold: the share of segments "
                                                                 "rated worst that are labelled bad (the threshold "
                                                                 "is that quantile of the scores; the authors' "
                                                                 "toxicity threshold left about 5% good)")
    segment: Literal["sentence", "line", "document"] = param(
        "sentence", help="what one control token covers: a sentence (the authors' toxicity and PII tasks), a line "
                         "(their PEP8 task) or a whole document")
    drop_token_fraction: float = param(0.01, ge=0, lt=1, help="share of segments left without a control token, so "
                                                              "the model also learns unconditional text (the "
                                                              "authors: 0.01, 0.1 for PEP8)")
    good_token: str = param("<|good|>", help="the control token of good segments (the authors: <|aligned|>)")
    bad_token: str = param("<|bad|>", help="the control token of bad segments (the authors: <|misaligned|>)")
    seed: int = param(0, help="seed of the token dropping")

    def validate(self, path: str) -> None:
        from effitrain.registry import REGISTRY

        if self.threshold is not None and self.bad_fraction is not None:
            raise ConfigError(f"{path}: set one of {path}.threshold and {path}.bad_fraction (give the other null)")
        if self.threshold is None and self.bad_fraction is None:
            raise ConfigError(f"{path}: set {path}.threshold (a score) or {path}.bad_fraction (a share of segments)")
        for key in ("good_token", "bad_token"):
            if not getattr(self, key).strip():
                raise ConfigError(f"{path}.{key}: empty; a control token needs a spelling, e.g. <|good|>")
        if self.good_token == self.bad_token:
            raise ConfigError(f"{path}.bad_token: '{self.bad_token}' is also the good token; they must differ")
        block = REGISTRY.parse("scorer", dict(self.scorer), f"{path}.scorer")
        if getattr(block.params, "NEEDS_TARGET", False):
            raise ConfigError(f"{path}.scorer.name: scorer '{block.name}' needs target data, which control tokens "
                              f"do not declare; use a scorer without a target (e.g. perplexity)")
