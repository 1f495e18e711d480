"""Document embeddings from a reference model: one layer's hidden states, pooled over each document's tokens.

The one place the embedding scorers (``embedding_kmeans``, ``rds_plus``, ``facility_location``, ``got_d``) turn texts
into vectors, so they pool the same way and share the ``datasets`` cache of the candidates' embeddings.

Poolings:

* ``mean``: every real token weighs the same (padding excluded).
* ``position_weighted``: token ``t`` (1-based, within the document) weighs ``t / sum(1..len)``, so later tokens,
  which have attended to more of the document, count more.  This is RDS+'s pooling (Ivison et al. 2025; authors'
  ``compute_influence_cosinesim.py --pooling weighted_mean``, after SGPT); they embed one example per batch, so their
  weights run over the example's own tokens, as ours do under right padding.
* ``last``: the hidden state of the document's last real token (INGENIOUS's representation: their GPT-2 script takes
  the token before the first padding position).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from effitrain.selection.base import column_numpy
from effitrain.selection.fingerprints import map_fingerprint

POOLINGS = ("mean", "position_weighted", "last")


def pool_hidden(hidden: Any, mask: Any, pooling: str) -> Any:
    """``hidden``: B x T x H, ``mask``: B x T (1 = real token, right padded) -> B x H."""
    import torch
    m = mask.to(hidden.dtype)
    if pooling == "position_weighted":
        w = torch.cumsum(m, dim=1) * m          # 1, 2, ..., len on real tokens, 0 on padding
    elif pooling == "mean":
        w = m
    elif pooling == "last":
        w = (torch.cumsum(m, dim=1) == m.sum(dim=1, keepdim=True)) * m   # 1 on the last real token only
    else:
        raise ValueError(f"unknown pooling {pooling!r}; valid: {', '.join(POOLINGS)}")
    w = w / w.sum(dim=1, keepdim=True).clamp_min(1.0)
    return (hidden * w.unsqueeze(-1)).sum(dim=1)


def embed(model: Any, encode: Callable, texts: list[str], device: str, layer: int = -1,
          pooling: str = "mean") -> np.ndarray:
    """B x H float32 pooled hidden states of ``layer`` (``-1``: the last, after the final norm)."""
    import torch
    ids, mask = encode(list(texts))
    ids, mask = ids.to(device), mask.to(device)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return pool_hidden(out.hidden_states[layer].float(), mask, pooling).cpu().numpy().astype(np.float32)


def normalize_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-8)


def embed_dataset(ds: Any, model: Any, encode: Callable, *, device: str, layer: int, pooling: str, model_tag: str,
                  max_length: int, batch_size: int) -> np.ndarray:
    """N x H embeddings of ``ds['text']`` through ``datasets.map`` (cached under a fingerprint of the model, the
    layer and the pooling), in row order."""
    payload = {"model": model_tag, "max_length": max_length, "layer": layer}
    if pooling != "mean":  # mean keeps the cache key embedding_kmeans always had
        payload["pooling"] = pooling
    texts = ds.select_columns(["text"])

    def fn(batch):
        return {"emb": embed(model, encode, batch["text"], device, layer, pooling).tolist()}

    out = texts.map(fn, batched=True, batch_size=batch_size, remove_columns=texts.column_names,
                    new_fingerprint=map_fingerprint(texts, "embedding", payload), desc="selection: embedding")
    return column_numpy(out, "emb", np.float32)


def embed_list(texts: list[str], model: Any, encode: Callable, *, device: str, layer: int, pooling: str,
               batch_size: int) -> np.ndarray:
    """Embeddings of a few texts (a target set), without the ``datasets`` cache."""
    parts = [embed(model, encode, texts[i:i + batch_size], device, layer, pooling)
             for i in range(0, len(texts), batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)
