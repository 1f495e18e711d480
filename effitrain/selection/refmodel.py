"""Reference and proxy models for the model-based scorers (perplexity, embedding_kmeans, loss_trajectory, less).

A *reference model* is any ``transformers`` causal LM saved with ``save_pretrained`` together with its tokenizer
(``model_path``; e.g. the ``final_model`` folder of an earlier effitrain run).  A *proxy* is a byte-level Llama
(vocabulary 256 bytes + pad + bos, ``proxy_hidden_size`` x ``proxy_layers``, about 0.1 M parameters by default)
trained briefly inside the selection stage: it needs no tokenizer and no download.

When a scorer that reads a reference model (perplexity, embedding_kmeans, less) is given no ``model_path``, it uses
the *pool proxy*: a byte-level proxy trained for ``proxy_steps`` on random batches of the candidate pool, saved under
the selection cache as ``proxy-<key>/`` (key: the candidates' content hash, the proxy's parameters and the seed), so a
second selection on the same pool (another budget, another method) loads it instead of training again.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np

PAD, BOS, BYTE_VOCAB = 256, 257, 258


def device_of(params: Any) -> str:
    import torch
    if params.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return params.device


class ByteEncoder:
    """UTF-8 bytes with a leading BOS, right-padded with PAD."""

    def __init__(self, max_length: int) -> None:
        self.max_length = max_length

    def __call__(self, texts: list[str]):
        import torch
        seqs = [[BOS] + list(t.encode("utf-8"))[:self.max_length - 1] for t in texts]
        width = max(2, max(len(s) for s in seqs))
        ids = torch.full((len(seqs), width), PAD, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
        return ids, mask


class HFEncoder:
    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tok = tokenizer
        self.max_length = max_length
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token if self.tok.eos_token is not None else self.tok.unk_token
        if self.tok.pad_token_id is None:
            self.tok.add_special_tokens({"pad_token": "<pad>"})
        self.tok.padding_side = "right"

    def __call__(self, texts: list[str]):
        enc = self.tok(list(texts), truncation=True, max_length=self.max_length, padding=True, return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        if ids.shape[1] < 2:  # empty texts: one pad column more so that there is a next-token target
            import torch
            ids = torch.cat([ids, torch.full_like(ids, self.tok.pad_token_id)], 1)
            mask = torch.cat([mask, torch.zeros_like(mask)], 1)
        return ids, mask


def load_reference(params: Any) -> tuple[Any, Callable]:
    """``(model in eval mode on its device, encoder)`` for ``params.model_path``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from effitrain.registry import ConfigError

    try:
        tok = AutoTokenizer.from_pretrained(params.model_path)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"selection.scorer.model_path: no tokenizer loadable from '{params.model_path}' "
                          f"(save it next to the model with save_pretrained): {exc}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(params.model_path, torch_dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"selection.scorer.model_path: cannot load a causal LM from '{params.model_path}': "
                          f"{exc}") from None
    model.to(device_of(params)).eval()
    return model, HFEncoder(tok, params.max_length)


def byte_proxy(params: Any, seed: int) -> tuple[Any, Callable]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    h = params.proxy_hidden_size
    heads = max(1, h // 32)
    cfg = LlamaConfig(vocab_size=BYTE_VOCAB, hidden_size=h, intermediate_size=2 * h, num_hidden_layers=params.proxy_layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=params.max_length + 8,
                      pad_token_id=PAD, bos_token_id=BOS, eos_token_id=PAD, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).to(device_of(params))
    return model, ByteEncoder(params.max_length)


def lr_factor(step: int, total: int, kind: str, warmup_ratio: float) -> float:
    """The multiplier of the base LR for the update at (0-based) ``step`` of ``total``, as ``transformers``'
    ``get_{linear,cosine}_schedule_with_warmup`` with ``warmup_steps = ceil(warmup_ratio * total)``."""
    import math
    warm = math.ceil(warmup_ratio * total)
    if kind == "constant":
        return 1.0
    if step < warm:
        return step / max(1, warm)
    progress = (step - warm) / max(1, total - warm)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    if kind == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"unknown schedule {kind}")


def epoch_batches(n: int, batch_size: int, epochs: int, seed: int) -> list[list[np.ndarray]]:
    """Per epoch, a fresh permutation of ``range(n)`` cut into batches (the last one may be smaller)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(epochs):
        order = rng.permutation(n)
        out.append([np.sort(order[i:i + batch_size]) for i in range(0, n, batch_size)])
    return out


def train_epochs(model: Any, encode: Callable, ds: Any, *, epochs: int, batch_size: int, lr: float, seed: int,
                 device: str, schedule: str = "constant", warmup_ratio: float = 0.0,
                 indices: Optional[np.ndarray] = None,
                 on_step: Optional[Callable[[int, Any], None]] = None,
                 on_epoch: Optional[Callable[[int, Any, list[float]], None]] = None) -> list[float]:
    """``epochs`` passes over ``ds['text']`` (rows ``indices``, default all) with AdamW (weight decay 0, gradient
    clipping 1.0) under an LR ``schedule`` with warm-up; every example is seen once per epoch.

    ``on_step(step, optimizer)`` after every update (and with step 0 before the first); ``on_epoch(epoch,
    optimizer, lrs_of_that_epoch)`` at the end of every epoch (1-based).  Returns the training losses."""
    import torch
    rows = np.arange(len(ds)) if indices is None else np.asarray(indices)
    plan = epoch_batches(len(rows), batch_size, epochs, seed)
    total = sum(len(e) for e in plan)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses: list[float] = []
    step = 0
    if on_step is not None:
        on_step(0, opt)
    for epoch, batches in enumerate(plan, 1):
        lrs = []
        for b in batches:
            cur = lr * lr_factor(step, total, schedule, warmup_ratio)
            for group in opt.param_groups:
                group["lr"] = cur
            lrs.append(cur)
            losses.append(_train_step(model, encode, ds.select(rows[b])["text"], opt, params, device))
            step += 1
            if on_step is not None:
                model.eval()
                on_step(step, opt)
        model.eval()
        if on_epoch is not None:
            on_epoch(epoch, opt, lrs)
    model.eval()
    return losses


def pool_proxy(params: Any, candidates: Any, ctx: Any, method: str) -> tuple[Any, Callable, dict]:
    """The byte-level proxy trained on the pool (``proxy_steps`` random batches), from the cache when it exists.

    Returns ``(model in eval mode, encoder, info)``; ``info`` says whether it was trained or reused and where it lies.
    """
    import hashlib
    import json
    import logging
    import os
    import shutil
    import tempfile
    from pathlib import Path

    log = logging.getLogger("effitrain.selection")
    cand_hash = getattr(ctx, "candidates_hash", None)
    if cand_hash is None:
        from effitrain.selection.manifest import content_hash
        cand_hash = content_hash(candidates)
    spec = {"candidates": cand_hash, "seed": ctx.seed, "kind": "byte-llama", "max_length": params.max_length,
            **{k: getattr(params, k) for k in ("proxy_hidden_size", "proxy_layers", "proxy_lr", "proxy_batch_size",
                                               "proxy_steps")}}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    folder = Path(ctx.work_dir) / f"proxy-{key[:16]}" if ctx.work_dir else None
    dev = device_of(params)
    if folder is not None and (folder / "proxy.json").is_file():
        from transformers import LlamaForCausalLM
        model = LlamaForCausalLM.from_pretrained(folder, torch_dtype=__import__("torch").float32).to(dev).eval()
        log.info("selection %s: no selection.scorer.model_path; reusing the byte-level proxy trained on this pool "
                 "(%s)", method, folder)
        return model, ByteEncoder(params.max_length), {"proxy": "reused", "proxy_dir": str(folder)}
    log.info("selection %s: no selection.scorer.model_path; training a byte-level proxy (%d x %d, %d steps of %d "
             "documents) on the pool as the reference model%s", method, params.proxy_hidden_size,
             params.proxy_layers, params.proxy_steps, params.proxy_batch_size,
             f", cached in {folder}" if folder else "")
    model, encode = byte_proxy(params, ctx.seed)
    losses = train_steps(model, encode, candidates.select_columns(["text"]), steps=params.proxy_steps,
                         batch_size=params.proxy_batch_size, lr=params.proxy_lr, seed=ctx.seed, device=dev)
    info = {"proxy": "trained", "proxy_first_loss": round(losses[0], 4) if losses else None,
            "proxy_last_loss": round(losses[-1], 4) if losses else None}
    if folder is not None:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            model.save_pretrained(tmp)
            (tmp / "proxy.json").write_text(json.dumps({**spec, **info}, indent=1, sort_keys=True) + "\n")
            if folder.exists():  # another process trained the same proxy meanwhile: same inputs, same model
                shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        info["proxy_dir"] = str(folder)
    return model, encode, info


def reference_or_proxy(params: Any, candidates: Any, ctx: Any, method: str) -> tuple[Any, Callable, dict, str]:
    """``(model, encoder, info, tag)``: the reference at ``model_path``, else the cached pool proxy; ``tag``
    fingerprints the model for ``datasets.map`` caching."""
    if params.model_path:
        from effitrain.selection.fingerprints import model_fingerprint
        model, encode = load_reference(params)
        return model, encode, {"reference": "model_path"}, model_fingerprint(params.model_path)
    model, encode, info = pool_proxy(params, candidates, ctx, method)
    return model, encode, {"reference": "pool proxy", **info}, "proxy-" + info.get("proxy_dir", repr(params))


def _train_step(model: Any, encode: Callable, texts: list[str], opt: Any, params: list, device: Any) -> float:
    """One clipped AdamW step of the proxy on ``texts``; returns the batch's mean token loss."""
    import torch
    model.train()
    ids, mask = encode(texts)
    loss = token_losses(model, ids.to(device), mask.to(device)).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return float(loss.detach())


def token_losses(model: Any, ids: Any, mask: Any):
    """Per-example mean next-token loss (a tensor of shape [batch]) and the model output."""
    import torch.nn.functional as F
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=False)
    logits = out.logits[:, :-1].float()
    tgt = ids[:, 1:]
    m = mask[:, 1:].float()
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none").view_as(m)
    return (nll * m).sum(1) / m.sum(1).clamp_min(1.0)


def example_losses(model: Any, encode: Callable, texts: list[str], device: str) -> list[float]:
    import torch
    ids, mask = encode(texts)
    with torch.no_grad():
        return token_losses(model, ids.to(device), mask.to(device)).cpu().tolist()


def learnable_token_medians(model: Any, encode: Callable, texts: list[str], device: str, top_k: int) -> list[float]:
    """Per example, the median next-token loss over the tokens the model ranks among its ``top_k`` predictions
    (SALT's selection score, 2410.18779 Eq. 10 as its reviews describe it: hard, yet learnable by the small model);
    NaN for an example with no such token (nothing in it is learnable: every selector ranks it last)."""
    import torch
    import torch.nn.functional as F

    ids, mask = encode(texts)
    ids, mask = ids.to(device), mask.to(device)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    target = ids[:, 1:]
    nll = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")
    target_logit = logits.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    kth_logit = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1]
    learnable = mask[:, 1:].bool() & (target_logit >= kth_logit)
    medians = []
    for losses, keep in zip(nll, learnable):
        kept = losses[keep]
        medians.append(float(torch.quantile(kept, 0.5)) if kept.numel() else float("nan"))
    return medians


def train_steps(model: Any, encode: Callable, ds: Any, *, steps: int, batch_size: int, lr: float, seed: int,
                device: str, indices: Optional[np.ndarray] = None,
                on_step: Optional[Callable[[int], None]] = None) -> list[float]:
    """A few AdamW steps on random batches of ``ds['text']`` (rows ``indices``, default all); returns the losses.

    ``on_step(step)`` is called after every step (and with 0 before the first)."""
    import torch
    rng = np.random.default_rng(seed)
    rows = np.arange(len(ds)) if indices is None else np.asarray(indices)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    if on_step is not None:
        on_step(0)
    for step in range(1, steps + 1):
        pick = np.sort(rng.choice(rows, size=min(batch_size, len(rows)), replace=False))
        losses.append(_train_step(model, encode, ds.select(pick)["text"], opt, params, device))
        if on_step is not None:
            on_step(step)
    model.eval()
    return losses


def is_small(params: Any, max_bytes: int = 20_000_000) -> bool:
    """A byte proxy, or a reference model whose weight files total under ``max_bytes`` (about 5 M parameters)."""
    import os
    path = getattr(params, "model_path", None)
    if not path:
        return True
    if not os.path.isdir(path):
        return False
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
               if f.endswith((".safetensors", ".bin", ".pt")))
    return size < max_bytes


class cpu_threads:
    """Run a tiny model on one CPU thread, restoring the setting afterwards.

    Below a few million parameters every op is too small to split, and intra-op threads only contend (on a shared
    two-core machine one thread was 10x faster than two).  Larger models and GPUs keep torch's setting."""

    def __init__(self, params: Any) -> None:
        self.small = device_of(params) == "cpu" and is_small(params)
        self.saved: Optional[int] = None

    def __enter__(self) -> "cpu_threads":
        if self.small:
            import torch
            self.saved = torch.get_num_threads()
            torch.set_num_threads(1)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.saved is not None:
            import torch
            torch.set_num_threads(self.saved)


class ModelScorer:
    """Base of the model-based scorers: ``score`` runs ``_score`` under :class:`cpu_threads`."""

    def __init__(self, params: Any) -> None:
        self.params = params

    def score(self, candidates: Any, ctx: Any) -> Any:
        with cpu_threads(self.params):
            return self._score(candidates, ctx)
