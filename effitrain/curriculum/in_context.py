"""``curriculum: in_context`` -- In-Context Pretraining (Shi et al., ICLR 2024, arXiv 2310.10638).

Related documents are put into the same training contexts, so that a model reads a document after its neighbours:

1. **Features.** Each document becomes a TF-IDF vector over hashed word 1- and 2-grams (scikit-learn's
   ``HashingVectorizer`` + ``TfidfTransformer``, sublinear tf, L2-normalised).  The paper embeds documents with
   Contriever; a hashed lexical vector needs no download and no vocabulary in memory.
2. **kNN graph.** Every document's ``k`` nearest neighbours by cosine similarity (brute force, excluding itself);
   the graph is undirected with edge weight = similarity.
3. **Traversal** (the paper's Algorithm 1, an approximate maximum travelling-salesman path): start at an unvisited
   document of minimum degree, repeatedly walk to the most similar unvisited neighbour; when none is left, start a
   new path at the next minimum-degree unvisited document.  Every document is visited exactly once.
4. **Near-duplicate filter** (the authors' ``sort.py``): walking the final order, a document whose first 100
   characters share more than ``dedup_threshold`` of their character 3-grams (Jaccard) with the previous kept
   document is dropped.
5. **Packing.** The documents, in path order, are concatenated (each followed by the end-of-text token) into one
   stream that is cut into rows of ``seq_len`` tokens, across domains; a row's ``domain`` is that of the document it
   starts in.  The rows are cached by content and parameters.

Training then shuffles the *contexts* (rows) each epoch like ``curriculum: shuffle``, so a batch mixes topics while
each context holds a chain of related documents.  The state is the shuffle sampler's (epoch, position).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from effitrain.curriculum.samplers import ShuffleSampler
from effitrain.registry import ConfigError

_VERSION = 1  # bump when features, graph, traversal or packing change, so old caches are not reused


def document_features(texts: Sequence[str], n_features: int) -> Any:
    """L2-normalised TF-IDF over hashed word 1- and 2-grams (a scipy sparse matrix, one row per document)."""
    from sklearn.feature_extraction.text import HashingVectorizer, TfidfTransformer

    counts = HashingVectorizer(n_features=n_features, ngram_range=(1, 2), alternate_sign=False, norm=None,
                               lowercase=True).transform(texts)
    return TfidfTransformer(sublinear_tf=True, norm="l2").fit_transform(counts)


def knn_graph(features: Any, k: int) -> list[dict[int, float]]:
    """The undirected kNN graph: ``graph[i] = {j: cosine similarity}`` for j among i's k nearest neighbours or
    i among j's (a document is never its own neighbour)."""
    from sklearn.neighbors import NearestNeighbors

    n = features.shape[0]
    graph: list[dict[int, float]] = [{} for _ in range(n)]
    if n < 2:
        return graph
    k = min(k, n - 1)
    distances, indices = NearestNeighbors(n_neighbors=k + 1, metric="cosine", algorithm="brute") \
        .fit(features).kneighbors(features)
    for i in range(n):
        kept = 0
        for j, d in zip(indices[i].tolist(), distances[i].tolist()):
            if j == i or kept == k:  # itself (ties with identical documents may put it anywhere in the list)
                continue
            kept += 1
            similarity = 1.0 - d
            graph[i][j] = max(graph[i].get(j, -np.inf), similarity)
            graph[j][i] = max(graph[j].get(i, -np.inf), similarity)
    return graph


def traverse(graph: Sequence[dict[int, float]]) -> list[list[int]]:
    """The paper's Algorithm 1: paths that start at a minimum-degree unvisited document and walk to the most
    similar unvisited neighbour (ties: the lower index) until none is left.  Each document is in exactly one path."""
    n = len(graph)
    visited = np.zeros(n, dtype=bool)
    # degrees do not change as documents are visited (the paper's min_degree over the graph): one sorted pass
    starts = sorted(range(n), key=lambda i: (len(graph[i]), i))
    paths: list[list[int]] = []
    for start in starts:
        if visited[start]:
            continue
        path, current = [start], start
        visited[start] = True
        while True:
            best, best_sim = -1, -np.inf
            for j, sim in graph[current].items():
                if not visited[j] and (sim > best_sim or (sim == best_sim and j < best)):
                    best, best_sim = j, sim
            if best < 0:
                break
            visited[best] = True
            path.append(best)
            current = best
        paths.append(path)
    return paths


def _trigrams(text: str) -> set[str]:
    return {text[i:i + 3] for i in range(len(text) - 2)}


def drop_near_duplicates(order: Sequence[int], texts: Sequence[str], threshold: Optional[float]) -> list[int]:
    """``order`` without the documents whose first 100 characters' 3-gram Jaccard similarity with the previous kept
    document exceeds ``threshold`` (the authors' filter, applied to consecutive documents); None keeps all."""
    if threshold is None:
        return list(order)
    kept: list[int] = []
    previous: Optional[set[str]] = None
    for i in order:
        grams = _trigrams(texts[i][:100])
        if previous is not None:
            union = grams | previous
            if union and len(grams & previous) / len(union) > threshold:
                continue
        kept.append(i)
        previous = grams
    return kept


def chained_rows(documents: Any, tokenizer: Any, seq_len: int, *, neighbors: int, n_features: int,
                 dedup_threshold: Optional[float]) -> dict[str, np.ndarray]:
    """``rows`` packed in traversal order, the ``domain`` of each row, and the ``order`` of documents (cached)."""
    from effitrain.data.cache import ContentHash, dataset_content_hash
    from effitrain.data.packing import tokenizer_fingerprint
    from effitrain.data.repack import cached_arrays, pack_stream, tokenize_documents

    key = ContentHash("in_context", _VERSION, dataset_content_hash(documents, ("text", "domain")),
                      tokenizer_fingerprint(tokenizer), seq_len, neighbors, n_features,
                      repr(dedup_threshold)).hexdigest()

    def build() -> dict[str, np.ndarray]:
        texts = documents["text"]
        paths = traverse(knn_graph(document_features(texts, n_features), neighbors))
        order = drop_near_duplicates([i for path in paths for i in path], texts, dedup_threshold)
        ids = tokenize_documents([texts[i] for i in order], tokenizer)
        packed = pack_stream(ids, seq_len)
        domains = np.asarray(documents["domain"], dtype=str)[np.asarray(order, np.int64)[packed["first_doc"]]]
        path_of = np.empty(len(texts), np.int64)
        for p, path in enumerate(paths):
            path_of[path] = p
        return {"rows": packed["rows"], "domain": domains, "order": np.asarray(order, np.int64),
                "path": path_of}

    return cached_arrays("in_context", key, build)


class InContextSampler(ShuffleSampler):
    """Shuffled contexts over the chain-packed rows (``train_rows``, which the loop gathers from)."""

    def __init__(self, chained: dict[str, np.ndarray], **layout: Any) -> None:
        self.train_rows = chained["rows"]
        self.domains = chained["domain"]
        self.document_order = chained["order"]
        super().__init__(len(self.train_rows), **layout)


def build_in_context(params: Any, packed: Any, *, seed: int, micro_batch_size: int, grad_accum: int,
                     world_size: int, rank: int, documents: Any = None, tokenizer: Any = None) -> InContextSampler:
    """The ``curriculum: in_context`` builder (``packed`` gives the sequence length; the rows are re-packed)."""
    if documents is None or tokenizer is None:
        raise ConfigError("curriculum: 'in_context' needs the training documents and the tokenizer")
    seq_len = int(packed.features["input_ids"].length)
    chained = chained_rows(documents, tokenizer, seq_len, neighbors=params.neighbors, n_features=params.n_features,
                           dedup_threshold=params.dedup_threshold)
    if len(chained["rows"]) == 0:
        raise ConfigError(f"dataset.seq_len: the chained documents make less than one sequence of {seq_len} tokens")
    return InContextSampler(chained, seed=seed, micro_batch_size=micro_batch_size, grad_accum=grad_accum,
                            world_size=world_size, rank=rank)
