"""LESS scorer (Xia et al. 2024, arXiv 2402.04333; authors' code princeton-nlp/LESS): influence through
Adam-preconditioned LoRA gradients.

1. **Base model with LoRA** (``peft``; ``lora_r``, ``lora_alpha``, ``lora_dropout``, ``lora_targets`` -- the paper's
   q/k/v/o projections, alpha = 4 r): the reference at ``model_path``, or the pool proxy (a byte-level Llama trained
   on the candidates, cached; see :mod:`effitrain.selection.refmodel`).
2. **Warm-up**: the LoRA is trained for ``warmup_epochs`` epochs on a random ``warmup_fraction`` of the pool (AdamW,
   ``warmup_schedule`` with ``warmup_ratio`` warm-up, as the paper's 4 epochs on 5 %).  At the end of every epoch a
   checkpoint keeps the LoRA weights, AdamW's moments ``m``, ``v`` and the epoch's **average learning rate**.
3. **Features**, per checkpoint: a training candidate's feature is its Adam-preconditioned gradient
   ``m' / sqrt(v' + eps)`` with ``m' = b1 m + (1 - b1) g`` and ``v' = b2 v + (1 - b2) g^2`` (g: the gradient of
   its mean token loss with respect to the LoRA weights; the authors' ``obtain_gradients_with_adam``, no bias
   correction); a target example's feature is its plain gradient (they use SGD gradients for validation data).
   Both are projected to ``proj_dim`` numbers by a fixed Rademacher matrix (the same at every checkpoint) and
   L2-normalized.
4. **Score**: ``sum_i w_i cos(train_i, target_i)`` with ``w_i`` the checkpoints' average learning rates normalized to
   sum 1; the per-target-example scores are averaged within each target task and the **maximum over tasks** is the
   candidate's score (``matching.py``).  Tasks come from ``selection.target.task_field``; a domain target is one
   task.  The ``topk`` selector keeps the best.

Needs: a target set (a reference model is optional).  Cost: the warm-up (``warmup_epochs x warmup_fraction x N``
examples) plus, per checkpoint, one forward + backward pass per ``batch_size`` candidates (per-example gradients come
from the adapter layers' inputs and output gradients, not from one backward pass per example) and a B x P by
P x proj_dim product, P = LoRA parameters; the projection matrix takes P x proj_dim x 4 bytes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from effitrain.selection.base import Scores, column_numpy
from effitrain.selection.refmodel import ModelScorer, device_of, reference_or_proxy, token_losses, train_epochs
from effitrain.selection.scorers.lm import _map_main


def lora_model(model, p):
    from peft import LoraConfig, get_peft_model

    from effitrain.registry import ConfigError
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in p.lora_targets if t not in names]
    if missing:
        raise ConfigError(f"selection.scorer.lora_targets: no module named {', '.join(missing)} in the model; "
                          f"e.g. {', '.join(sorted(n for n in names if n.endswith('proj'))[:6])}")
    cfg = LoraConfig(r=p.lora_r, lora_alpha=p.lora_alpha, target_modules=list(p.lora_targets),
                     lora_dropout=p.lora_dropout, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def adam_feature(g, m, v, betas=(0.9, 0.999), eps: float = 1e-8):
    """LESS's training-gradient feature: one more Adam moment update with ``g``, then ``m' / sqrt(v' + eps)``."""
    b1, b2 = betas
    m2 = b1 * m + (1 - b1) * g
    v2 = b2 * v + (1 - b2) * g * g
    return m2 / (v2 + eps) ** 0.5


def checkpoint_weights(avg_lrs: list[float]) -> np.ndarray:
    """The checkpoints' average learning rates, normalized to sum 1 (LESS weights checkpoint i by its eta_i).
    All zero (a one-step warm-up whose only step is the LR ramp's 0) -> equal weights."""
    w = np.asarray(avg_lrs, dtype=np.float64)
    return w / w.sum() if w.sum() > 0 else np.full(len(w), 1.0 / len(w))


def combine(sims_per_ckpt: list[np.ndarray], avg_lrs: list[float], tasks: np.ndarray) -> np.ndarray:
    """``sims_per_ckpt[i]``: N x T cosines at checkpoint i.  Weighted by the checkpoints' average LR, averaged over
    each task's target examples, maximum over tasks -> N scores."""
    w = checkpoint_weights(avg_lrs)
    total = sum(wi * s for wi, s in zip(w, sims_per_ckpt))
    per_task = np.stack([total[:, tasks == t].mean(axis=1) for t in np.unique(tasks)], axis=1)
    return per_task.max(axis=1)


class GradientFeatures:
    """Per-example LoRA gradients, a whole batch per backward pass.

    A LoRA adapter is two bias-free ``nn.Linear`` layers, and the gradient of a linear layer's weight for one example
    is ``sum_t grad_out_t x_t^T`` over that example's tokens.  Forward hooks keep each adapter layer's input and a
    tensor hook its output gradient; one backward pass of the *sum* of the per-example losses (examples do not
    interact: causal attention, padding masked) then yields every example's own gradient by one einsum.  The flat
    order is ``self.layers``' order, each weight flattened as ``weight.reshape(-1)``.
    """

    def __init__(self, model, encode, device: str, batch_size: int = 16) -> None:
        import torch
        self.model, self.encode, self.device, self.batch_size = model, encode, device, batch_size
        self.layers = [(n, m) for n, m in model.named_modules()
                       if isinstance(m, torch.nn.Linear) and m.weight.requires_grad]
        if not self.layers:
            raise RuntimeError("LESS: the model has no trainable LoRA layers")
        if any(m.bias is not None and m.bias.requires_grad for _, m in self.layers):
            raise RuntimeError("LESS: LoRA layers with a trainable bias are not supported (use bias='none')")
        self.num_params = sum(m.weight.numel() for _, m in self.layers)
        self._x: dict[str, Any] = {}
        self._g: dict[str, Any] = {}
        self._handles = [module.register_forward_hook(self._forward_hook(name)) for name, module in self.layers]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def flat_state(self, optimizer, key: str):
        """An optimizer state tensor (``exp_avg`` / ``exp_avg_sq``) of the LoRA weights, flattened in our order."""
        import torch
        return torch.cat([optimizer.state[m.weight][key].reshape(-1) for _, m in self.layers])

    def _forward_hook(self, name: str):
        def hook(module, inputs, output):
            import torch
            if not torch.is_grad_enabled():
                return
            self._x[name] = inputs[0].detach()

            def keep(grad):
                self._g[name] = grad.detach()
            output.register_hook(keep)
        return hook

    def grads(self, texts: list[str]):
        """B x P per-example gradients of each text's mean token loss (a float32 torch tensor)."""
        import torch
        out = []
        self.model.eval()
        texts = list(texts)
        for i in range(0, len(texts), self.batch_size):
            ids, mask = self.encode(texts[i:i + self.batch_size])
            self._x.clear()
            self._g.clear()
            losses = token_losses(self.model, ids.to(self.device), mask.to(self.device))
            losses.sum().backward()
            self.model.zero_grad(set_to_none=True)
            b = ids.shape[0]
            out.append(torch.cat([torch.einsum("bto,bti->boi", self._g[n].float(), self._x[n].float()).reshape(b, -1)
                                  for n, _ in self.layers], dim=1))
        return torch.cat(out)


def rademacher(num_params: int, proj_dim: int, seed: int, device: str):
    import torch
    g = torch.Generator().manual_seed(seed)
    return ((torch.randint(0, 2, (num_params, proj_dim), generator=g).float() * 2 - 1) / proj_dim ** 0.5).to(device)


def _normalize(v):
    return v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)


class LESSScorer(ModelScorer):
    def _score(self, candidates, ctx) -> Scores:
        import torch
        p = self.params
        dev = device_of(p)
        texts = candidates.select_columns(["text"])
        model, encode, info, tag = reference_or_proxy(p, candidates, ctx, "less")
        model = lora_model(model, p)
        feats = GradientFeatures(model, encode, dev, batch_size=p.batch_size)

        # warm-up on a random share of the pool; a checkpoint (weights, Adam moments, average LR) per epoch
        rng = np.random.default_rng(ctx.seed + 1)
        n = max(1, int(round(p.warmup_fraction * len(texts))))
        sub = np.sort(rng.permutation(len(texts))[:n])
        ckpts: list[dict] = []

        def snapshot(epoch, opt, lrs):
            ckpts.append({"epoch": epoch, "avg_lr": float(np.mean(lrs)),
                          "weights": [m.weight.detach().clone() for _, m in feats.layers],
                          "m": feats.flat_state(opt, "exp_avg").clone(),
                          "v": feats.flat_state(opt, "exp_avg_sq").clone()})

        warm_losses = train_epochs(model, encode, texts, epochs=p.warmup_epochs, batch_size=p.warmup_batch_size,
                                   lr=p.warmup_lr, seed=ctx.seed + 1, device=dev, schedule=p.warmup_schedule,
                                   warmup_ratio=p.warmup_ratio, indices=sub, on_epoch=snapshot)
        model.eval()  # LoRA dropout off for the gradient features

        proj = rademacher(feats.num_params, p.proj_dim, ctx.seed, dev)
        n_tgt = min(p.max_target, len(ctx.target))
        tgt_ds = ctx.target.select(range(n_tgt))
        tgt_texts = list(tgt_ds["text"])
        tasks = np.asarray(tgt_ds["task"], dtype=object).astype(str) if "task" in tgt_ds.column_names \
            else np.zeros(n_tgt, dtype=object).astype(str)
        betas = tuple(p.adam_betas)
        sims = []
        for ck in ckpts:
            with torch.no_grad():
                for (_, mod), w in zip(feats.layers, ck["weights"]):
                    mod.weight.copy_(w)
            target = _normalize(feats.grads(tgt_texts) @ proj)            # SGD gradients for the target
            m, v = ck["m"].to(dev), ck["v"].to(dev)

            def fn(batch, target=target, m=m, v=v):
                g = feats.grads(batch["text"])
                x = _normalize(adam_feature(g, m, v, betas, p.adam_eps) @ proj)
                return {"sims": (x @ target.T).cpu().numpy().astype(np.float64).tolist()}

            out = _map_main(texts, fn, "less-adam",
                            {"model": tag, "params": repr(p), "seed": ctx.seed, "epoch": ck["epoch"],
                             "target": float(target.abs().sum())}, p.batch_size)
            sims.append(column_numpy(out, "sims", np.float64).reshape(len(texts), n_tgt))
        feats.remove()
        avg_lrs = [ck["avg_lr"] for ck in ckpts]
        scores = combine(sims, avg_lrs, tasks)
        return Scores(scores=scores,
                      info={**info, "lora_parameters": int(feats.num_params), "target_used": n_tgt,
                            "target_tasks": int(len(np.unique(tasks))), "warmup_examples": int(n),
                            "warmup_last_loss": round(warm_losses[-1], 4),
                            "checkpoint_weights": [round(float(w), 4) for w in checkpoint_weights(avg_lrs)]})
