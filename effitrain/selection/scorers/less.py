"""LESS scorer (Xia et al. 2024, arXiv 2402.04333): influence through LoRA gradients.

1. A model with LoRA adapters (``peft``; ``lora_r``, ``lora_targets``): the reference at ``model_path``, or the
   byte-level proxy pre-trained for ``proxy_steps`` on the pool.  The LoRA is warmed up for ``warmup_steps`` on a
   random ``warmup_fraction`` of the pool (LESS warms up on 5 %).
2. The gradient of each example's loss with respect to the LoRA parameters only, projected to ``proj_dim`` numbers
   by a fixed Rademacher matrix (Johnson-Lindenstrauss: cosines are preserved), then L2-normalized.
3. Score = mean cosine similarity to the target examples' projected gradients (``max_target`` of them).

Simplification, stated: LESS uses Adam-preconditioned gradients for the training examples; here both sides are plain
SGD gradients (the warm-up's Adam state is not carried), which keeps the score a pure gradient-alignment measure.

Needs: a target set (a reference model is optional).  Cost: one forward + backward pass per ``batch_size``
examples (per-example gradients come from the adapter layers' inputs and output gradients, not from one backward
pass per example), plus a batch x P by P x proj_dim product, P = LoRA parameters; the projection matrix takes
proj_dim x P x 4 bytes (about 4 MB for the default proxy).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from effitrain.selection.base import Scores, column_numpy
from effitrain.selection.refmodel import ModelScorer, byte_proxy, device_of, load_reference, token_losses, train_steps
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
    """Projected, normalized per-example LoRA gradients, a whole batch per backward pass.

    A LoRA adapter is two bias-free ``nn.Linear`` layers, and the gradient of a linear layer's weight for one example
    is ``sum_t grad_out_t x_t^T`` over that example's tokens.  Forward hooks keep each adapter layer's input and a
    tensor hook its output gradient; one backward pass of the *sum* of the per-example losses (examples do not
    interact: causal attention, padding masked) then yields every example's own gradient by one einsum.
    """

    def __init__(self, model, encode, device: str, proj_dim: int, seed: int, batch_size: int = 16) -> None:
        import torch
        self.model, self.encode, self.device, self.batch_size = model, encode, device, batch_size
        self.layers = [(n, m) for n, m in model.named_modules()
                       if isinstance(m, torch.nn.Linear) and m.weight.requires_grad]
        if not self.layers:
            raise RuntimeError("LESS: the model has no trainable LoRA layers")
        if any(m.bias is not None and m.bias.requires_grad for _, m in self.layers):
            raise RuntimeError("LESS: LoRA layers with a trainable bias are not supported (use bias='none')")
        self.num_params = sum(m.weight.numel() for _, m in self.layers)
        g = torch.Generator().manual_seed(seed)
        self.proj = ((torch.randint(0, 2, (self.num_params, proj_dim), generator=g).float() * 2 - 1)
                     / proj_dim ** 0.5).to(device)
        self._x: dict[str, Any] = {}
        self._g: dict[str, Any] = {}
        for name, module in self.layers:
            module.register_forward_hook(self._forward_hook(name))

    def _forward_hook(self, name: str):
        def hook(module, inputs, output):
            if not torch_grad_enabled():
                return
            self._x[name] = inputs[0].detach()

            def keep(grad):
                self._g[name] = grad.detach()
            output.register_hook(keep)
        return hook

    def __call__(self, texts: list[str]) -> np.ndarray:
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
            flat = torch.cat([torch.einsum("bto,bti->boi", self._g[n].float(), self._x[n].float()).reshape(b, -1)
                              for n, _ in self.layers], dim=1)
            v = flat @ self.proj
            out.append((v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)).cpu().numpy())
        return np.concatenate(out).astype(np.float32)


def torch_grad_enabled() -> bool:
    import torch
    return torch.is_grad_enabled()


class LESSScorer(ModelScorer):
    def _score(self, candidates, ctx) -> Scores:
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
        feats = GradientFeatures(model, encode, dev, p.proj_dim, ctx.seed, batch_size=p.batch_size)
        tgt_texts = list(ctx.target.select(range(min(p.max_target, len(ctx.target))))["text"])
        target_dir = feats(tgt_texts).mean(axis=0)

        def fn(batch):
            return {"less": (feats(batch["text"]) @ target_dir).tolist()}

        out = _map_main(texts, fn, "less",
                        {"model": _model_tag(p.model_path) if p.model_path else "byte-proxy", "params": repr(p),
                         "seed": ctx.seed, "target": float(np.abs(target_dir).sum())}, p.batch_size)
        return Scores(scores=column_numpy(out, "less", np.float64),
                      info={"lora_parameters": int(feats.num_params), "target_used": len(tgt_texts)})
