"""GOT-D scorer ("Get more for less: Principled Data Selection for Warming Up Fine-Tuning in LLMs", Kang et al.,
ICLR 2024, arXiv 2405.02774; authors' code REDSgnaoh/DV4LLM, ``pre_process+OT_selection/ot-selection.ipynb``).

The selected data should move the distribution the model was trained on toward the target.  With the candidates as
a stand-in for that distribution, the gradient of the optimal-transport distance ``OT(candidates, target)`` with
respect to each candidate's probability mass says how the distance changes when that candidate gets more weight:
the candidates with the **most negative** gradient are those whose up-weighting moves the mixture fastest toward the
target, and are kept first.

1. **Embeddings** of candidates and target examples: the reference model's pooled hidden states
   (:mod:`effitrain.selection.embeddings`), L2-normalized with ``normalize: true``.
2. **Entropic OT** between uniform masses on the candidates and on the target examples, cost = squared Euclidean
   distance (ott-jax's ``PointCloud`` default, as the authors use it), regularization ``epsilon`` (theirs: 0.1),
   solved by POT's log-domain Sinkhorn.  The candidates' dual potential ``f`` is the gradient of the OT distance with
   respect to their masses (unique up to a constant, since the masses sum to 1).
3. **Calibrated gradient**, as the authors (after LAVA): ``f_i - (mean(f) - f_i / N)``; score = minus that, so the
   ``topk`` selector keeps the most negative gradients first (their ``rank(ascending=True)``).

Cost: one forward pass per candidate and target example, an N x T cost matrix (N x T x 8 bytes) and ``O(N T)`` per
Sinkhorn iteration.
"""

from __future__ import annotations

import numpy as np

from effitrain.selection.base import Scores
from effitrain.selection.embeddings import embed_dataset, embed_list, normalize_rows
from effitrain.selection.refmodel import ModelScorer, device_of, reference_or_proxy


def ot_potentials(x: np.ndarray, y: np.ndarray, epsilon: float, max_iter: int = 5000,
                  tol: float = 1e-7) -> tuple[np.ndarray, dict]:
    """Dual potential of the points ``x`` (N x d, uniform mass) in the entropic OT to ``y`` (T x d, uniform mass)
    with squared-Euclidean cost; ``(f, info)``."""
    try:
        import ot
    except ImportError:
        from effitrain.registry import ConfigError
        raise ConfigError("selection.scorer.name: got_d needs POT (pip install 'effitrain[methods]', or pip install "
                          "pot)") from None
    a = np.full(len(x), 1.0 / len(x))
    b = np.full(len(y), 1.0 / len(y))
    cost = ot.dist(x, y, metric="sqeuclidean")
    plan, log = ot.sinkhorn(a, b, cost, epsilon, method="sinkhorn_log", numItermax=max_iter, stopThr=tol,
                            log=True, warn=False)
    f = epsilon * np.asarray(log["log_u"], dtype=np.float64)
    info = {"ot_cost": float((plan * cost).sum()), "sinkhorn_iterations": int(log.get("niter", -1)),
            "sinkhorn_error": float(log["err"][-1]) if log.get("err") else None}
    return f, info


def calibrated_gradient(f: np.ndarray) -> np.ndarray:
    """The authors' calibration of the candidates' potentials: ``f - (mean(f) - f / N)`` (LAVA's, removing the
    constant the potentials are defined up to)."""
    return f - (f.mean() - f / len(f))


class GOTDScorer(ModelScorer):
    def _score(self, candidates, ctx) -> Scores:
        p = self.params
        dev = device_of(p)
        model, encode, info, tag = reference_or_proxy(p, candidates, ctx, "got_d")
        x = embed_dataset(candidates, model, encode, device=dev, layer=p.layer, pooling=p.pooling, model_tag=tag,
                          max_length=p.max_length, batch_size=p.batch_size).astype(np.float64)
        y = embed_list(list(ctx.target["text"]), model, encode, device=dev, layer=p.layer, pooling=p.pooling,
                       batch_size=p.batch_size).astype(np.float64)
        if p.normalize:
            x, y = normalize_rows(x), normalize_rows(y)
        f, ot_info = ot_potentials(x, y, p.epsilon, p.max_iterations, p.tolerance)
        grad = calibrated_gradient(f)
        return Scores(scores=-grad,
                      info={**info, **ot_info, "target_used": int(len(y)), "embedding_dim": int(x.shape[1])})
