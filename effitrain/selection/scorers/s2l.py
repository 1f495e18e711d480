"""S2L scorer (Yang et al. 2024, arXiv 2403.07384): loss trajectories of a small proxy model, clustered.

A small model is trained on the candidate pool for ``proxy_steps`` steps (the byte-level proxy from scratch, or the
reference model at ``model_path`` fine-tuned); at ``checkpoints`` evenly spaced points of that run (the last one at
the end) the loss of **every** candidate is recorded.  The trajectories (N x checkpoints) are clustered with k-means
and the ``cluster_balanced`` selector samples the clusters evenly, smallest first, so examples that learn alike are
represented alike.  Score = minus the final loss.

Needs: nothing (a reference model is optional).  Cost: ``proxy_steps`` training steps of ``proxy_batch_size``
examples plus ``checkpoints`` x N forward passes; with the default 0.1 M-parameter byte proxy about 1-2 k
examples/s per checkpoint on one CPU core at 128 bytes.
"""

from __future__ import annotations

import numpy as np

from effitrain.selection.base import Scores, column_numpy
from effitrain.selection.refmodel import ModelScorer, byte_proxy, device_of, example_losses, load_reference, train_steps
from effitrain.selection.scorers.lm import _map_main, _model_tag, kmeans


class LossTrajectoryScorer(ModelScorer):
    def _score(self, candidates, ctx) -> Scores:
        p = self.params
        model, encode = load_reference(p) if p.model_path else byte_proxy(p, ctx.seed)
        dev = device_of(p)
        record_at = set(np.linspace(p.proxy_steps / p.checkpoints, p.proxy_steps, p.checkpoints).round().astype(int))
        texts = candidates.select_columns(["text"])
        columns = []
        base = {"model": _model_tag(p.model_path) if p.model_path else "byte-proxy", "params": repr(p),
                "seed": ctx.seed}

        def record(step: int) -> None:
            if step not in record_at:
                return
            model.eval()

            def fn(batch):
                return {"loss": example_losses(model, encode, batch["text"], dev)}

            out = _map_main(texts, fn, f"s2l-{step}", {**base, "step": step}, p.batch_size)
            columns.append(column_numpy(out, "loss", np.float64))

        losses = train_steps(model, encode, texts, steps=p.proxy_steps, batch_size=p.proxy_batch_size,
                             lr=p.proxy_lr, seed=ctx.seed, device=dev, on_step=record)
        traj = np.stack(columns, axis=1)
        labels, _ = kmeans(traj, p.num_clusters, ctx.seed)
        return Scores(scores=-traj[:, -1], clusters=labels,
                      info={"proxy_first_loss": round(losses[0], 4), "proxy_last_loss": round(losses[-1], 4),
                            "trajectory_points": traj.shape[1], "clusters": int(labels.max() + 1)})
