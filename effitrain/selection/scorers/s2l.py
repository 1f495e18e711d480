"""S2L scorer (Yang et al. 2024, arXiv 2403.07384; authors' code BigML-CS-UCLA/S2L): clusters of the *training*
loss trajectories of a small proxy model.

1. A small model is trained for ``proxy_epochs`` full passes over the candidate pool (AdamW, ``proxy_batch_size``
   per update, ``proxy_schedule`` with ``proxy_warmup_ratio`` warm-up; the authors fine-tune Pythia-70M for 3 epochs
   with a cosine schedule).  Here it is the byte-level proxy from scratch, or the reference at ``model_path``
   fine-tuned.
2. At ``checkpoints`` evenly spaced updates of that run (the last at its end) the loss of **every** candidate is
   recorded.  Every candidate is a training example of the run, so each row is the trajectory of that example's own
   training loss (as the authors' ``get_trajectories.py`` evaluates the checkpoints on the training set).  NaN losses
   become 0, as theirs.
3. The trajectories are clustered with k-means **per data source** (the pool's ``domain`` column; ``per_domain``),
   ``num_clusters`` per domain.  Cluster labels are unique over the pool; ``groups`` carry the domain, so the
   ``cluster_balanced`` selector with ``per_source: true`` shares the budget equally over domains (smallest first),
   then over the clusters of each domain with more than 2 members (``min_cluster_size: 3``), drawing at random
   inside a cluster -- the authors' ``S2L.query`` / ``faiss_kmeans_selection``.  Score = minus the final loss.

Needs: nothing (a reference model is optional).  Cost: ``proxy_epochs x N / proxy_batch_size`` training steps plus
``checkpoints x N`` forward passes (byte proxy: a few hundred examples/s per CPU core at 128 bytes).
"""

from __future__ import annotations

import numpy as np

from effitrain.selection.base import Scores, column_numpy
from effitrain.selection.refmodel import (ModelScorer, byte_proxy, device_of, epoch_batches, example_losses,
                                          load_reference, train_epochs)
from effitrain.selection.fingerprints import model_fingerprint
from effitrain.selection.scorers.lm import _map_main, kmeans


def record_steps(total_steps: int, checkpoints: int) -> list[int]:
    """``checkpoints`` update counts evenly spaced over the run, the last one at its end."""
    return sorted(set(np.linspace(total_steps / checkpoints, total_steps, checkpoints).round().astype(int).tolist()))


def cluster_per_group(traj: np.ndarray, groups: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k-means with ``k`` clusters inside every group; labels unique over all groups."""
    labels = np.zeros(len(traj), dtype=np.int64)
    offset = 0
    for g in np.unique(groups):
        rows = np.flatnonzero(groups == g)
        lab, _ = kmeans(traj[rows], k, seed)
        labels[rows] = lab + offset
        offset += int(lab.max()) + 1
    return labels


class LossTrajectoryScorer(ModelScorer):
    def _score(self, candidates, ctx) -> Scores:
        p = self.params
        model, encode = load_reference(p) if p.model_path else byte_proxy(p, ctx.seed)
        dev = device_of(p)
        texts = candidates.select_columns(["text"])
        total = sum(len(e) for e in epoch_batches(len(texts), p.proxy_batch_size, p.proxy_epochs, ctx.seed))
        record_at = set(record_steps(total, p.checkpoints))
        columns = []
        base = {"model": model_fingerprint(p.model_path) if p.model_path else "byte-proxy", "params": repr(p),
                "seed": ctx.seed}

        def record(step: int, _opt) -> None:
            if step not in record_at:
                return

            def fn(batch):
                return {"loss": example_losses(model, encode, batch["text"], dev)}

            out = _map_main(texts, fn, f"s2l-train-{step}", {**base, "step": step}, p.batch_size)
            columns.append(column_numpy(out, "loss", np.float64))

        losses = train_epochs(model, encode, texts, epochs=p.proxy_epochs, batch_size=p.proxy_batch_size,
                              lr=p.proxy_lr, seed=ctx.seed, device=dev, schedule=p.proxy_schedule,
                              warmup_ratio=p.proxy_warmup_ratio, on_step=record)
        traj = np.nan_to_num(np.stack(columns, axis=1), nan=0.0)
        if p.per_domain and "domain" in candidates.column_names:
            names, groups = np.unique(np.asarray(candidates["domain"], dtype=object).astype(str), return_inverse=True)
        else:
            names, groups = np.array(["all"]), np.zeros(len(traj), dtype=np.int64)
        labels = cluster_per_group(traj, groups, p.num_clusters, ctx.seed)
        return Scores(scores=-traj[:, -1], clusters=labels, groups=groups.astype(np.int64),
                      info={"proxy_first_loss": round(losses[0], 4), "proxy_last_loss": round(losses[-1], 4),
                            "proxy_steps": total, "trajectory_points": traj.shape[1],
                            "sources": len(names), "clusters": int(labels.max() + 1)})
