"""Learnability-Quality Score (LQS) of packed training rows: DELT's data scoring (Dai et al. 2025, arXiv 2506.21545;
authors' ``data_scoring/lqs/annotation``: ``trainer.py`` ``inner_backward`` / ``compute_proxy_ct`` and
``grad_utils.jvp_single_grad``).

What the authors compute
------------------------
A proxy LM is trained for ``T`` steps on the data.  Going backwards over its states ``theta_T, ..., theta_0`` they carry
an adjoint ``lambda`` that starts as the target ("dev") loss gradient at ``theta_T`` and grows by the target gradient
at every earlier state (``lambda_i = lambda_{i+1} + grad L_dev(theta_i) - lr * H lambda_{i+1}``).  Every
``compute_ct_interval`` steps each example ``n`` gets the contribution::

    ct_n(i) = ||lambda|| * (||g_n(theta_i)|| / ||g_n(theta_later)||) * cos(g_n(theta_i), lambda)

with ``g_n`` the example's own loss gradient and ``theta_later`` the previous (later in training) state at which it
was computed (norm 1 the first time).  The cosine with the target gradient is the *quality*; the ratio of the
gradient norm before to after training is the *learnability* (an example the model learns has a shrinking
gradient).  The score is ``sum_i ct_n(i)``, then standardised (z-score) and clipped to [-3, 3].

What this module computes, and where it differs
-----------------------------------------------
The same sum over ``ct_states`` states evenly spaced over ``proxy_steps`` AdamW steps of a small Llama trained from
scratch on the run's own packed rows (vocabulary: the run's tokenizer ids); ``lambda`` is the sum of the target
gradients of the later states, **without the Hessian term** (no Hessian-vector products; on a proxy trained for a
hundred steps the term is a correction of the order ``lr * H``), with the target gradient evaluated at the recorded
states only, each standing for the ``interval`` of steps that ends at it (:func:`adjoint_weights`: at the latest
recorded state ``lambda = interval * g_T``, at each earlier one ``interval`` times the next later recorded state's
gradient more, so ``lambda`` at state ``s`` counts ``T - s`` gradients, as the authors' sum; they evaluate the
target gradient at every step).  The constant learning-rate factor of ``ct`` is
dropped (the z-score removes it).  Every row is annotated directly; the authors annotate a proxy sample and train a
separate scorer model to infer the rest (a cost saving that a pool of a few thousand rows does not need).  The target
is ``target_rows`` rows of ``target_domain`` from the training data (the authors: LIMA).  Only ``annotate_rows``
random rows get the gradient score; a ridge regression on the final proxy's mean-pooled hidden state, fitted to their
standardised scores, scores every row (the authors fine-tune a 125M model with a linear head on the mean encoding).

Cost: ``proxy_steps`` training steps plus target gradients, and ``ct_states x rows`` single-row backward passes.
Scores are cached under ``$EFFITRAIN_CACHE/curriculum/lqs/`` by the rows' content, the parameters and the seed.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Optional

import numpy as np

VERSION = 2   # 2: lambda holds T - s target gradients at state s (1 held T - s - interval + 1)


def standardise(scores: np.ndarray) -> np.ndarray:
    """The authors' ``normalize``: z-score, clipped to [-3, 3] (constant scores give zeros)."""
    std = float(np.std(scores))
    z = (scores - np.mean(scores)) / std if std > 0 else np.zeros_like(scores)
    return np.clip(z, -3, 3)


def ct_states(total_steps: int, count: int) -> list[int]:
    """The ``count`` states (step numbers ``0 .. total_steps - 1``) at which contributions are computed, evenly
    spaced as the authors' ``i % compute_ct_interval == 0``; the final state ``total_steps`` only starts ``lambda``."""
    interval = max(1, total_steps // count)
    return list(range(0, total_steps, interval))[:count]


def adjoint_weights(recorded_desc: list[int], total_steps: int) -> dict[int, int]:
    """How many of the authors' per-step target gradients each recorded one stands for in ``lambda``.

    The authors' ``lambda`` at state ``s`` is ``sum_{j = s+1}^{T} grad L_dev(theta_j)`` (without the Hessian term):
    ``T - s`` gradients.  Only the recorded states' gradients are computed here, so each stands for the steps from
    the recorded state before it (exclusive) up to itself: the final state's for ``T - s_last``, a recorded state
    ``r``'s for ``r - (the next earlier recorded state)``.  ``lambda`` at every recorded state then holds ``T - s``
    gradients, as the authors' does, built only from states later than ``s``."""
    states = [total_steps, *recorded_desc]
    return {later: later - earlier for later, earlier in zip(states, states[1:])}


def _proxy(vocab: int, seq_len: int, hidden: int, layers: int, seed: int, device: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    heads = max(1, hidden // 32)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=seq_len + 8,
                      tie_word_embeddings=True, attn_implementation="eager")  # eager: vmap has no SDPA rule
    return LlamaForCausalLM(cfg).to(device)


def _flat_grad(model: Any, ids: Any) -> Any:
    """The gradient of the mean next-token loss of rows ``ids`` as one flat vector."""
    import torch
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def row_gradients(model: Any, rows: Any, chunk: int = 16):
    """Yield ``(start, [chunk, P])``: each row's own loss gradient, flattened, ``chunk`` rows at a time
    (``torch.func.vmap`` over single-row losses; the same values as one backward pass per row)."""
    import torch
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}

    def row_loss(p, x):
        x = x.unsqueeze(0)
        return functional_call(model, p, (), {"input_ids": x, "labels": x}).loss

    per_row = vmap(grad(row_loss), in_dims=(None, 0))
    for start in range(0, rows.shape[0], chunk):
        g = per_row(params, rows[start:start + chunk])
        yield start, torch.cat([g[k].reshape(g[k].shape[0], -1) for k in params], dim=1)


def lqs_scores(ids: np.ndarray, target: np.ndarray, *, proxy_steps: int, states: int, batch_size: int, lr: float,
               hidden: int, layers: int, seed: int, device: str = "cpu",
               annotate: Optional[np.ndarray] = None, max_token: Optional[int] = None) -> tuple[np.ndarray, dict]:
    """Raw (unstandardised) LQS of rows ``annotate`` (default: all) of ``ids`` (``[N, S]`` token ids) against the
    target rows ``target``; ``info["model"]`` is the trained proxy (its final state), for a scorer fitted on it."""
    import torch

    annotate = np.arange(len(ids)) if annotate is None else np.asarray(annotate)

    # the proxy's vocabulary: the largest id of the rows (``max_token`` when the caller has read them already)
    vocab = max(_max_token(ids) if max_token is None else max_token, int(np.max(target))) + 1
    model = _proxy(vocab, ids.shape[1], hidden, layers, seed, device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng = np.random.default_rng([seed % 2**63, 7])
    tgt = torch.as_tensor(np.array(target), dtype=torch.long, device=device)
    record = ct_states(proxy_steps, states)
    interval = max(1, proxy_steps // states)
    saved: dict[int, dict] = {}
    dev_at: dict[int, Any] = {}              # the target gradient at each recorded state
    losses = []
    for step in range(proxy_steps + 1):      # state ``step`` = the weights after ``step`` updates
        if step in record or step == proxy_steps:
            dev_at[step] = _flat_grad(model, tgt)
            saved[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if step == proxy_steps:
            break
        pick = torch.as_tensor(np.array(ids[np.sort(rng.choice(len(ids), size=min(batch_size, len(ids)), replace=False))]),
                               dtype=torch.long, device=device)
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=pick, labels=pick).loss
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    final = saved.pop(proxy_steps)
    score = np.zeros(len(annotate), dtype=np.float64)
    later_norm = np.ones(len(annotate), dtype=np.float64)
    rows = torch.as_tensor(np.array(ids[annotate]), dtype=torch.long, device=device)
    recorded = sorted(saved, reverse=True)             # backwards in training time, as the adjoint pass
    weights = adjoint_weights(recorded, proxy_steps)
    lam = weights[proxy_steps] * dev_at[proxy_steps]
    for i, step in enumerate(recorded):
        model.load_state_dict(saved[step])
        lam_norm = float(lam.norm())
        for start, g in row_gradients(model, rows):
            g_norm = g.norm(dim=1).double().cpu().numpy()
            cos = np.clip((g @ lam).double().cpu().numpy() / np.maximum(g_norm * lam_norm, 1e-30), -1.0, 1.0)
            end = start + len(g_norm)
            score[start:end] += lam_norm * (g_norm / later_norm[start:end]) * cos
            later_norm[start:end] = g_norm
        if i + 1 < len(recorded):
            lam += weights[step] * dev_at[step]
    model.zero_grad(set_to_none=True)
    model.load_state_dict(final)
    return score, {"model": model, "interval": interval, "proxy_first_loss": round(losses[0], 4) if losses else None,
                   "proxy_last_loss": round(losses[-1], 4) if losses else None,
                   "ct_states": sorted(saved), "target_rows": len(target)}


def mean_hidden(model: Any, rows: np.ndarray) -> np.ndarray:
    """Mean-pooled last hidden state of ``rows`` (the authors' scorer encodes with ``data_scorer_encoding: mean``)."""
    import torch
    model.eval()
    with torch.no_grad():
        x = torch.as_tensor(np.asarray(rows), dtype=torch.long, device=model.device)
        return model.model(input_ids=x).last_hidden_state.float().mean(1).cpu().numpy()


def predicted_scores(model: Any, ids: Any, annotate: np.ndarray, annotated: np.ndarray, *, batch: int = 64,
                     alpha: float = 1.0) -> np.ndarray:
    """Every row's score from a linear scorer (ridge) on the proxy's mean hidden state, fitted to the ``annotated``
    scores of rows ``annotate`` (sorted).  Read ``batch`` rows at a time, twice (the batches holding annotated rows
    to fit, then every batch to predict), so what is held is the scores, not a feature row per row; a row's features
    come from the same batch in both passes, so the fit sees exactly the features it predicts from."""
    from sklearn.linear_model import Ridge

    n = len(ids)
    features = np.empty((len(annotate), model.config.hidden_size), dtype=np.float32)
    for b in np.unique(annotate // batch):
        lo = int(b) * batch
        inside = (annotate >= lo) & (annotate < lo + batch)
        features[inside] = mean_hidden(model, ids[lo:min(lo + batch, n)])[annotate[inside] - lo]
    scorer = Ridge(alpha=alpha).fit(features, annotated)
    scores = np.empty(n, dtype=np.float64)
    for lo in range(0, n, batch):
        scores[lo:lo + batch] = scorer.predict(mean_hidden(model, ids[lo:min(lo + batch, n)]))
    return scores


def target_rows(domains: tuple[np.ndarray, np.ndarray], domain: Optional[str], count: int, seed: int) -> np.ndarray:
    """Row indices of the target: ``count`` random rows of ``domain`` (every domain when None); ``domains`` is
    ``(codes, names)`` (:func:`effitrain.data.packing.domain_codes`)."""
    from effitrain.registry import ConfigError, choices_text
    codes, names = domains
    if domain is None:
        pool = np.arange(len(codes))
    else:
        hits = np.flatnonzero(names == domain)
        pool = np.flatnonzero(np.asarray(codes) == hits[0]) if len(hits) else np.zeros(0, dtype=np.int64)
    if len(pool) == 0:
        from effitrain.data.shards import code_counts
        present = names[code_counts(codes, len(names)) > 0]
        raise ConfigError(f"curriculum.target_domain: '{domain}' has no packed training rows; the training data's "
                          f"domains: {choices_text(sorted(present.tolist()))}")
    return np.sort(np.random.default_rng([seed % 2**63, 11]).permutation(pool)[:count])


_BLOCK = 4096  # rows read at a time (from token shards: through their memory maps)


def _max_token(ids: Any) -> int:
    return max((int(np.max(ids[lo:lo + _BLOCK])) for lo in range(0, len(ids), _BLOCK)), default=0)


def _content_digest(ids: Any, domains: tuple[np.ndarray, np.ndarray]) -> tuple[Any, int]:
    """``(sha256, largest token id)``: the hash of the rows' bytes, row after row, then of the rows' domain names
    joined by ``|``.  Read a block at a time, once, so token shards are hashed without being loaded (an in-memory
    array of the same rows hashes the same)."""
    h = hashlib.sha256()
    largest = 0
    for lo in range(0, len(ids), _BLOCK):
        block = np.ascontiguousarray(ids[lo:lo + _BLOCK])
        h.update(block.tobytes())
        largest = max(largest, int(block.max()))
    codes, names = domains
    block = 1 << 16
    for lo in range(0, len(codes), block):
        h.update((("|" if lo else "") + "|".join(names[np.asarray(codes[lo:lo + block])].tolist())).encode())
    return h, largest


def cached_lqs(ids: Any, domains: tuple[np.ndarray, np.ndarray], params: Any, *, seed: int,
               cache: Optional[str] = None) -> tuple[np.ndarray, dict]:
    """Standardised LQS of every packed row, computed once per (rows, parameters, seed) and cached.

    ``ids`` is an ``[N, S]`` array of token ids or token shards' rows (read in blocks, never whole: what grows with
    the rows is 8 bytes a row of scores); ``domains`` is ``(codes, names)``."""
    import torch

    from effitrain.paths import cache_dir

    keyed = {k: getattr(params, k) for k in ("target_domain", "target_rows", "annotate_rows", "proxy_steps", "ct_states",
                                              "proxy_batch_size", "proxy_lr", "proxy_hidden_size", "proxy_layers")}
    h, max_token = _content_digest(ids, domains)
    h.update(json.dumps({**keyed, "seed": seed, "version": VERSION}, sort_keys=True).encode())
    folder = cache_dir("curriculum", "lqs") if cache is None else cache
    path = os.path.join(str(folder), f"{h.hexdigest()[:24]}.npz")
    if os.path.exists(path):
        with np.load(path) as stored:
            return stored["scores"], {"cache_hit": True, "path": path}
    target = target_rows(domains, params.target_domain, params.target_rows, seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    annotate = (np.arange(len(ids)) if params.annotate_rows >= len(ids)
                else np.sort(np.random.default_rng([seed % 2**63, 17]).permutation(len(ids))[:params.annotate_rows]))
    from effitrain.console import say

    # minutes of CPU on a first run (a gradient per row at every recorded state): say so before the wait
    say(f"LQS: scoring {len(annotate):,} of {len(ids):,} packed rows against {len(target)} target rows -- a proxy "
        f"of {params.proxy_layers} x {params.proxy_hidden_size} trained {params.proxy_steps} steps, a gradient per row "
        f"at {params.ct_states} states; once, then cached in {folder}")
    raw, info = lqs_scores(ids, ids[target], proxy_steps=params.proxy_steps, states=params.ct_states,
                           batch_size=params.proxy_batch_size, lr=params.proxy_lr, hidden=params.proxy_hidden_size,
                           layers=params.proxy_layers, seed=seed, device=device, annotate=annotate,
                           max_token=max_token)
    model = info.pop("model")
    annotated = standardise(raw)   # the authors standardise the annotations, then train the scorer on them
    if len(annotate) == len(ids):
        scores = annotated
    else:
        scores = predicted_scores(model, ids, annotate, annotated)
        info["scorer_fit_corr"] = round(float(np.corrcoef(scores[annotate], annotated)[0, 1]), 4)
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    np.savez(tmp, scores=scores, raw=raw, annotated=annotate)
    os.replace(tmp, path)                            # atomic: a concurrent rank reads a whole file or none
    return scores, {**info, "cache_hit": False, "path": path}
