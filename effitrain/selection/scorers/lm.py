"""Reference-model scorers.

``perplexity``: the mean next-token loss of each example under a reference model (score = loss; the ``window``
selector keeps one contiguous window of the sorted losses holding the budget -- bottom, middle or top -- as
"Perplexed by Perplexity" (Ankner et al., arXiv 2405.20541) selects).  ``statistic: topk_median`` scores instead by
the median loss over the tokens the reference ranks among its ``top_k`` predictions (SALT's score, 2410.18779).
Needs: nothing (``model_path``, or the pool proxy, see :func:`effitrain.selection.refmodel.pool_proxy`).  Cost: one
forward pass per example (``batch_size`` per pass, ``max_length`` tokens), plus training the proxy once per pool.

``embedding_kmeans`` (Diversify and Conquer, arXiv 2409.11378): mean-pooled hidden states
of a reference model, optionally L2-normalized, clustered with scikit-learn k-means; the ``cluster_balanced``
selector then takes an equal share from every cluster.  Score = minus the distance to the cluster centre (used when
``within: score``).  Needs: nothing (``model_path``, or the pool proxy).  Cost: one forward pass per example plus k-means on an N x hidden matrix
held in memory (N x hidden x 4 bytes).
"""

from __future__ import annotations

import numpy as np

from effitrain.selection.base import Scores, column_numpy
from effitrain.selection.embeddings import embed_dataset, normalize_rows
from effitrain.selection.fingerprints import map_fingerprint
from effitrain.selection.refmodel import (ModelScorer, device_of, example_losses, learnable_token_medians,
                                          reference_or_proxy)


def _map_main(ds, fn, tag, payload, batch_size):
    return ds.map(fn, batched=True, batch_size=batch_size, remove_columns=ds.column_names,
                  new_fingerprint=map_fingerprint(ds, tag, payload), desc=f"selection: {tag}")


class PerplexityScorer(ModelScorer):
    def _score(self, candidates, ctx) -> Scores:
        p = self.params
        model, encode, info, tag = reference_or_proxy(p, candidates, ctx, "perplexity")
        dev = device_of(p)

        def fn(batch):
            if p.statistic == "topk_median":
                return {"loss": learnable_token_medians(model, encode, batch["text"], dev, p.top_k)}
            return {"loss": example_losses(model, encode, batch["text"], dev)}

        payload = {"model": tag, "max_length": p.max_length}
        if p.statistic != "mean":  # the mean's cache key stays what it was
            payload.update(statistic=p.statistic, top_k=p.top_k)
        out = _map_main(candidates.select_columns(["text"]), fn, "perplexity", payload, p.batch_size)
        return Scores(scores=column_numpy(out, "loss", np.float64), info=info)


MINIBATCH_ABOVE = 20000  # points beyond which k-means runs in mini-batches


def kmeans_fit(x: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(labels, cluster centres)``; MiniBatchKMeans beyond ``MINIBATCH_ABOVE`` points (``x`` may be a memory map:
    the sharded selection fits the same model on the embeddings on disk)."""
    from sklearn.cluster import KMeans, MiniBatchKMeans
    k = max(1, min(k, len(x)))
    algo = (MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=3, batch_size=4096) if len(x) > MINIBATCH_ABOVE
            else KMeans(n_clusters=k, random_state=seed, n_init=4))
    labels = algo.fit_predict(x)
    return labels.astype(np.int64), algo.cluster_centers_


def kmeans(x: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and distance to own centre."""
    labels, centres = kmeans_fit(x, k, seed)
    return labels, np.linalg.norm(x - centres[labels], axis=1)


class EmbeddingKMeansScorer(ModelScorer):
    def _score(self, candidates, ctx) -> Scores:
        p = self.params
        model, encode, info, tag = reference_or_proxy(p, candidates, ctx, "diversity_kmeans")
        x = embed_dataset(candidates, model, encode, device=device_of(p), layer=p.layer, pooling="mean",
                          model_tag=tag, max_length=p.max_length, batch_size=p.batch_size)
        if p.normalize:
            x = normalize_rows(x)
        labels, dist = kmeans(x, p.num_clusters, ctx.seed)
        return Scores(scores=-dist, clusters=labels,
                      info={**info, "clusters": int(labels.max() + 1) if len(labels) else 0,
                            "embedding_dim": int(x.shape[1]) if x.ndim == 2 else 0})
