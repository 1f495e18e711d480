"""The uniform scorer: all zeros, for the random baseline.  Cost: nothing."""

from __future__ import annotations

import numpy as np

from effitrain.selection.base import Scores


class UniformScorer:
    def __init__(self, params) -> None:
        self.params = params

    def score(self, candidates, ctx) -> Scores:
        return Scores(scores=np.zeros(len(candidates)))
