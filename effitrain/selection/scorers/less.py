"""LESS scorer (Xia et al. 2024, arXiv 2402.04333): influence through LoRA gradients.

1. A model with LoRA adapters (``peft``; ``lora_r``, ``lora_targets``): the reference at ``model_path``, or the
   byte-level proxy pre-trained for ``proxy_steps`` on the pool.  The LoRA is warmed up for ``warmup_steps`` on a
   random ``warmup_fraction`` of the pool (LESS warms up on 5 %).
2. The gradient of each example's loss with respect to the LoRA parameters only, projected to ``proj_dim`` numbers
   by a fixed Rademacher matrix (Johnson-Lindenstrauss: cosines are preserved), then L2-normalized.
3. Score = mean cosine similarity to the target examples' projected gradients (``max_target`` of them).

Simplification, stated: LESS uses Adam-preconditioned gradients for the training examples; here both sides are plain
SGD gradients (the warm-up's Adam state is not carried), which keeps the score a pure gradient-alignment measure.

Needs: a target set (a reference model is optional).  Cost: one forward + backward pass per example (batch of one)
plus a proj_dim x P matrix product, P = LoRA parameters; the projection matrix takes proj_dim x P x 4 bytes
(about 4 MB for the default proxy).  The slowest CPU method: a few hundred examples/s with the proxy.
"""

from __future__ import annotations

import numpy as np

from effitrain.selection.base import Scores, column_numpy
from effitrain.selection.refmodel import byte_proxy, device_of, load_reference, token_losses, train_steps
from effitrain.selection.scorers.lm import _map_main, _model_tag


def lora_model(model, p):
    from peft import LoraConfig, get_peft_model

    from effitrain.registry import ConfigError
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in p.lora_targets if t not in names]
    if missing:
        raise ConfigError(f"selection.scorer.lora_targets: no module named {', '.join(missing)} in the model; "
                          f"e.g. {', '.join(sorted(n for n in names if n.endswith('proj'))[:6])}")
    cfg = LoraConfig(r=p.lora_r, lora_alpha=p.lora_alpha, target_modules=list(p.lora_targets), lora_dropout=0.0,
                     bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


class GradientFeatures:
    """Projected, normalized per-example LoRA gradients."""

    def __init__(self, model, encode, device: str, proj_dim: int, seed: int) -> None:
        import torch
        self.model, self.encode, self.device = model, encode, device
        self.params = [q for q in model.parameters() if q.requires_grad]
        n = sum(q.numel() for q in self.params)
        g = torch.Generator().manual_seed(seed)
        self.proj = ((torch.randint(0, 2, (n, proj_dim), generator=g).float() * 2 - 1) / proj_dim ** 0.5).to(device)

    def __call__(self, texts: list[str]) -> np.ndarray:
        import torch
        out = []
        self.model.eval()
        for text in texts:
            ids, mask = self.encode([text])
            loss = token_losses(self.model, ids.to(self.device), mask.to(self.device)).mean()
            grads = torch.autograd.grad(loss, self.params, allow_unused=True)
            flat = torch.cat([(gr if gr is not None else torch.zeros_like(q)).reshape(-1)
                              for gr, q in zip(grads, self.params)])
            v = flat @ self.proj
            out.append((v / v.norm().clamp_min(1e-12)).detach().cpu().numpy())
        return np.stack(out).astype(np.float32)


class LESSScorer:
    def __init__(self, params) -> None:
        self.params = params

    def score(self, candidates, ctx) -> Scores:
        p = self.params
        dev = device_of(p)
        texts = candidates.select_columns(["text"])
        if p.model_path:
            model, encode = load_reference(p)
        else:
            model, encode = byte_proxy(p, ctx.seed)
            if p.proxy_steps:
                train_steps(model, encode, texts, steps=p.proxy_steps, batch_size=p.proxy_batch_size,
                            lr=p.proxy_lr, seed=ctx.seed, device=dev)
        model = lora_model(model, p)
        if p.warmup_steps:
            rng = np.random.default_rng(ctx.seed + 1)
            n = max(1, int(round(p.warmup_fraction * len(texts))))
            sub = np.sort(rng.permutation(len(texts))[:n])
            train_steps(model, encode, texts, steps=p.warmup_steps, batch_size=p.proxy_batch_size, lr=p.proxy_lr,
                        seed=ctx.seed + 1, device=dev, indices=sub)
        feats = GradientFeatures(model, encode, dev, p.proj_dim, ctx.seed)
        tgt_texts = list(ctx.target.select(range(min(p.max_target, len(ctx.target))))["text"])
        target_dir = feats(tgt_texts).mean(axis=0)

        def fn(batch):
            return {"less": (feats(batch["text"]) @ target_dir).tolist()}

        out = _map_main(texts, fn, "less",
                        {"model": _model_tag(p.model_path) if p.model_path else "byte-proxy", "params": repr(p),
                         "seed": ctx.seed, "target": float(np.abs(target_dir).sum())}, p.batch_size)
        return Scores(scores=column_numpy(out, "less", np.float64),
                      info={"lora_parameters": int(feats.proj.shape[0]), "target_used": len(tgt_texts)})
