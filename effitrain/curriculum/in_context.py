"""``curriculum: in_context`` -- In-Context Pretraining (Shi et al., ICLR 2024, arXiv 2310.10638).

Related documents are put into the same training contexts, so that a model reads a document after its neighbours:

1. **Features.** Each document becomes a TF-IDF vector over hashed word 1- and 2-grams (scikit-learn's
   ``HashingVectorizer``; sublinear tf, smoothed idf, L2-normalised, as ``TfidfTransformer`` makes them).  The idf is
   a function of the document frequencies alone, so a sharded corpus sums them over its files.
2. **Embeddings.** The paper embeds documents with Contriever (768 dense dimensions); here a truncated SVD of the
   TF-IDF vectors (latent semantic analysis, ``embed_dims`` dense dimensions, L2-normalised) fitted on a fixed sample
   -- the ``_FIT_DOCS`` documents of lowest text hash -- needs no download.  A sharded corpus fits it on the same
   sample and embeds each file in its own task.
3. **kNN.** Every document's ``neighbors`` nearest documents by inner product of the embeddings (cosine), with
   FAISS as the authors searched: an exact ``Flat`` index up to ``_EXACT_DOCS`` documents, above it ``IVF<n>,PQ<m>``
   (the authors' ``IVF32768,PQ256`` scaled to the corpus) probing ``nprobe`` lists; the graph is undirected with
   edge weight = similarity.
4. **Traversal** (the paper's Algorithm 1, an approximate maximum travelling-salesman path): start at an unvisited
   document of minimum degree, repeatedly walk to the most similar unvisited neighbour; when none is left, start a
   new path at the next minimum-degree unvisited document.  Every document is visited exactly once.  The graph is
   held as arrays (CSR, 8 bytes an edge), not as Python objects.
5. **Near-duplicate filter** (the authors' ``sort.py``): walking the final order, a document whose first 100
   characters share more than ``dedup_threshold`` of their character 3-grams (Jaccard) with the previous kept
   document is dropped.
6. **Packing.** The documents, in path order, are concatenated (each followed by the end-of-text token) into one
   stream that is cut into rows of ``seq_len`` tokens, across domains; a row's ``domain`` is that of the document it
   starts in.  The rows are cached by content and parameters.

With ``data.executor`` the same steps run on the sharded corpus (:mod:`effitrain.curriculum.sharded_in_context`):
the chain order -- and the rows -- equal this module's on the same documents.

Training then shuffles the *contexts* (rows) each epoch like ``curriculum: shuffle``, so a batch mixes topics while
each context holds a chain of related documents.  The state is the shuffle sampler's (epoch, position).
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

from effitrain.curriculum.samplers import ShuffleSampler
from effitrain.registry import ConfigError

_VERSION = 4  # bump when features, graph, traversal or packing change, so old caches are not reused
# 2: LSA embeddings and a FAISS index (was: exact cosine on the sparse TF-IDF vectors); 3: the SVD in float32;
# 4: an IVF index trained on 40 points a list (was 64)
_FIT_DOCS = 10_000     # documents the SVD is fitted on (the lowest text hashes): a fixed cost, whatever the corpus
_EXACT_DOCS = 100_000  # up to this many documents the index is exact (Flat: 4 * embed_dims bytes a document)
_SEARCH_BATCH = 16_384  # queries per FAISS search call


def hashed_counts(texts: Sequence[str], n_features: int) -> Any:
    """Raw counts of hashed word 1- and 2-grams, lowercased (a scipy CSR matrix, one row per document)."""
    from sklearn.feature_extraction.text import HashingVectorizer

    return HashingVectorizer(n_features=n_features, ngram_range=(1, 2), alternate_sign=False, norm=None,
                             lowercase=True, dtype=np.float64).transform(texts)


def document_frequencies(counts: Any) -> np.ndarray:
    """How many documents hold each feature (int64), what the idf of a sharded corpus sums over its files."""
    return np.bincount(counts.indices, minlength=counts.shape[1]).astype(np.int64)


def idf(df: np.ndarray, n_docs: int) -> np.ndarray:
    """scikit-learn's smoothed idf: ``ln((1 + n) / (1 + df)) + 1``."""
    return np.log((1.0 + n_docs) / (1.0 + df.astype(np.float64))) + 1.0


def tfidf(counts: Any, idf_values: np.ndarray) -> Any:
    """Sublinear tf (``1 + ln tf``) times idf, each row L2-normalised (``TfidfTransformer(sublinear_tf=True)``)."""
    from sklearn.preprocessing import normalize

    x = counts.astype(np.float64, copy=True)
    x.data = (np.log(x.data) + 1.0) * idf_values[x.indices]
    return normalize(x, norm="l2", copy=False)


def document_features(texts: Sequence[str], n_features: int) -> Any:
    """L2-normalised TF-IDF over hashed word 1- and 2-grams of ``texts`` (the idf of these documents)."""
    counts = hashed_counts(texts, n_features)
    return tfidf(counts, idf(document_frequencies(counts), counts.shape[0]))


def text_rank(text: str) -> int:
    """A document's place in the SVD's fitting sample (lowest first): a hash of its text, so the sample does not
    depend on ids, files or how they are split into tasks."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def fit_sample(ranks: np.ndarray) -> np.ndarray:
    """Positions of the ``_FIT_DOCS`` lowest ranks (ties: the earlier position), ascending."""
    chosen = np.lexsort((np.arange(len(ranks)), ranks))[:_FIT_DOCS]
    return np.sort(chosen)


class Embedding:
    """The truncated SVD of the TF-IDF vectors, kept only for the features its sample holds (the other columns of
    its components are zero): ``embed(tfidf)`` gives float32 rows, L2-normalised."""

    def __init__(self, columns: np.ndarray, components: np.ndarray) -> None:
        self.columns, self.components = columns, components  # components: [dims, len(columns)] float32

    @property
    def dims(self) -> int:
        return int(self.components.shape[0])

    @classmethod
    def fit(cls, sample: Any, dims: int, seed: int = 0) -> "Embedding":
        from sklearn.utils.extmath import randomized_svd

        columns = np.unique(sample.indices)
        dims = max(1, min(dims, sample.shape[0], len(columns)))
        if len(columns) == 0:
            return cls(columns, np.zeros((1, 0), np.float32))
        # float32: half the memory and time of the float64 factorisation, on vectors that are float32 after it anyway
        _, _, vt = randomized_svd(sample[:, columns].astype(np.float32), dims, n_iter=5, random_state=seed)
        # the sign of a singular vector is arbitrary; fix it (largest entry positive) so a refit agrees
        signs = np.sign(vt[np.arange(len(vt)), np.abs(vt).argmax(axis=1)])
        return cls(columns.astype(np.int64), (vt * signs[:, None]).astype(np.float32))

    def save(self, path: Any) -> None:
        np.savez(path, columns=self.columns, components=self.components)

    @classmethod
    def load(cls, path: Any) -> "Embedding":
        with np.load(path) as z:
            return cls(z["columns"], z["components"])

    def embed(self, features: Any) -> np.ndarray:
        from sklearn.preprocessing import normalize

        out = np.asarray(features[:, self.columns] @ self.components.T, dtype=np.float32).reshape(-1, self.dims)
        return normalize(out, norm="l2", copy=False)


def index_spec(n_docs: int, dims: int, index: str) -> str:
    """The FAISS factory string: ``Flat`` (exact) or ``IVF<nlist>,PQ<m>`` (the authors' ``IVF32768,PQ256`` on
    768 dimensions, scaled: about ``4 * sqrt(n)`` lists, 4 dimensions a code byte)."""
    if index == "flat" or (index == "auto" and n_docs <= _EXACT_DOCS):
        return "Flat"
    nlist = 1 << max(4, int(round(np.log2(4 * np.sqrt(max(n_docs, 1))))))
    m = max(1, dims // 4)
    while dims % m:
        m -= 1
    return f"IVF{nlist},PQ{m}"


def knn_arrays(batches: Callable[[], Iterable[np.ndarray]], n_docs: int, dims: int, k: int, *, index: str = "auto",
               nprobe: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray, str]:
    """Every document's ``k`` nearest others by inner product: ``(neighbours [n, k] int32 -- int64 past 2^31
    documents --, similarities [n, k] float32, index spec)``, -1 where the index found fewer.  ``batches()`` yields
    the embeddings in document order (called once to train an IVF index, once to add, once to search): the index is
    the only copy held."""
    import faiss

    spec = index_spec(n_docs, dims, index)
    neighbours = np.full((n_docs, k), -1, np.int32 if n_docs < 2**31 else np.int64)
    sims = np.full((n_docs, k), -np.inf, np.float32)
    if n_docs < 2 or k == 0:
        return neighbours, sims, spec
    ix = faiss.index_factory(dims, spec, faiss.METRIC_INNER_PRODUCT)
    if not ix.is_trained:
        nlist = faiss.extract_index_ivf(ix).nlist
        # 40 points a list: faiss's own minimum for k-means without a warning is 39 (the authors trained on 1.5M
        # for 32768 lists, 48 a list); more only costs the reduce memory (4 * dims bytes a point)
        want = min(n_docs, max(40 * nlist, 65_536))
        rows = np.sort(np.random.default_rng(seed).choice(n_docs, size=want, replace=False))
        ix.train(_gather(batches(), rows, dims))
        faiss.extract_index_ivf(ix).nprobe = nprobe
    for block in batches():
        ix.add(np.ascontiguousarray(block, np.float32))
    start = 0
    for block in batches():
        d, i = ix.search(np.ascontiguousarray(block, np.float32), k + 1)
        for r in range(len(block)):
            me, kept = start + r, 0
            for j, s in zip(i[r].tolist(), d[r].tolist()):
                if j < 0 or j == me or kept == k:  # itself (an identical document may come first), or padding
                    continue
                neighbours[me, kept], sims[me, kept] = j, s
                kept += 1
        start += len(block)
    return neighbours, sims, spec


def _gather(blocks: Iterable[np.ndarray], rows: np.ndarray, dims: int) -> np.ndarray:
    """The embeddings of ``rows`` (sorted positions) from the blocks, into one array filled in place."""
    out, start = np.empty((len(rows), dims), np.float32), 0
    for block in blocks:
        lo, hi = np.searchsorted(rows, [start, start + len(block)])
        out[lo:hi] = np.asarray(block)[rows[lo:hi] - start]
        start += len(block)
    return out


def in_batches(embeddings: np.ndarray) -> Callable[[], Iterable[np.ndarray]]:
    return lambda: (embeddings[s:s + _SEARCH_BATCH] for s in range(0, len(embeddings), _SEARCH_BATCH))


def undirected(neighbours: np.ndarray, sims: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The undirected kNN graph as CSR ``(indptr, indices, weights)``: an edge where either end lists the other, its
    weight the larger of the two similarities (float32, as FAISS gives them); each row's neighbours sorted by
    index."""
    n = len(neighbours)
    ids = np.int32 if n < 2**31 else np.int64  # 4 bytes an id: the arrays here are a few per edge, for every edge
    src = np.repeat(np.arange(n, dtype=ids), neighbours.shape[1] if neighbours.ndim == 2 else 0)
    dst = neighbours.reshape(-1)
    ok = dst >= 0
    src, dst, w = src[ok], dst[ok].astype(ids), sims.reshape(-1)[ok].astype(np.float32)
    a, b, w = np.concatenate([src, dst]), np.concatenate([dst, src]), np.concatenate([w, w])
    del src, dst
    order = np.lexsort((-w, b, a))  # per (a, b) the largest weight first
    a, b, w = a[order], b[order], w[order]
    del order
    first = np.ones(len(a), bool)
    first[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
    a, b, w = a[first], b[first], w[first]
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(a, minlength=n), out=indptr[1:])
    return indptr, b, w


def traverse_csr(indptr: np.ndarray, indices: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The paper's Algorithm 1 on a CSR graph: ``(order, path start flags)`` -- documents in visiting order, True
    where a path starts.  Paths start at a minimum-degree unvisited document (ties: the lower index) and walk to the
    most similar unvisited neighbour (ties: the lower index) until none is left."""
    n = len(indptr) - 1
    visited = np.zeros(n, dtype=bool)
    degree = np.diff(indptr)
    # degrees do not change as documents are visited (the paper's min_degree over the graph): one sorted pass
    starts = np.lexsort((np.arange(n), degree))
    order = np.empty(n, np.int64)
    is_start = np.zeros(n, bool)
    pos = 0
    for start in starts.tolist():
        if visited[start]:
            continue
        is_start[pos] = True
        current = start
        while current >= 0:
            visited[current] = True
            order[pos] = current
            pos += 1
            lo, hi = indptr[current], indptr[current + 1]
            cand = indices[lo:hi]
            free = ~visited[cand]
            if not free.any():
                break
            w = np.where(free, weights[lo:hi], -np.inf)
            current = int(cand[int(np.argmax(w))])  # argmax: the first of equal weights, i.e. the lower index
    return order, is_start


def _trigrams(text: str) -> set[str]:
    return {text[i:i + 3] for i in range(len(text) - 2)}


def drop_near_duplicates(order: Sequence[int], texts: Any, threshold: Optional[float]) -> list[int]:
    """``order`` without the documents whose first 100 characters' 3-gram Jaccard similarity with the previous kept
    document exceeds ``threshold`` (the authors' filter, applied to consecutive documents); None keeps all.
    ``texts[i]``: the text of document ``i`` (its first 100 characters are enough)."""
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


def chain_order(embeddings: Callable[[], Iterable[np.ndarray]], n_docs: int, dims: int, prefixes: Any, *,
                neighbors: int, index: str, nprobe: int, dedup_threshold: Optional[float],
                seed: int = 0) -> tuple[np.ndarray, np.ndarray, str]:
    """Steps 3-5 on ``n_docs`` embedded documents: ``(kept documents in chain order, path id of every document,
    index spec)`` -- shared by the in-memory and the sharded paths."""
    k = min(neighbors, max(n_docs - 1, 0))
    neighbours, sims, spec = knn_arrays(embeddings, n_docs, dims, k, index=index, nprobe=nprobe, seed=seed)
    order, is_start = traverse_csr(*undirected(neighbours, sims))
    del neighbours, sims
    path_of = np.empty(n_docs, np.int64)
    path_of[order] = np.cumsum(is_start) - 1
    kept = np.asarray(drop_near_duplicates(order.tolist(), prefixes, dedup_threshold), np.int64)
    return kept, path_of, spec


def embed_documents(texts: Sequence[str], *, n_features: int, embed_dims: int) -> tuple[Any, np.ndarray, Embedding]:
    """Steps 1-2 on documents in memory: ``(TF-IDF vectors, float32 embeddings, the fitted Embedding)``."""
    features = document_features(texts, n_features)
    sample = fit_sample(np.array([text_rank(t) for t in texts], dtype=np.uint64))
    embedding = Embedding.fit(features[sample], embed_dims)
    return features, embedding.embed(features), embedding


def chain_settings(params: Any) -> dict[str, Any]:
    """The curriculum's parameters that decide the chain order (what both paths take, and key their caches on)."""
    return {"neighbors": int(params.neighbors), "n_features": int(params.n_features),
            "embed_dims": int(params.embed_dims), "index": str(params.index), "nprobe": int(params.nprobe),
            "dedup_threshold": params.dedup_threshold}


def chained_rows(documents: Any, tokenizer: Any, seq_len: int, **settings: Any) -> dict[str, np.ndarray]:
    """``rows`` packed in traversal order, the ``domain`` of each row, and the ``order`` of documents (cached).
    ``settings``: :func:`chain_settings`."""
    from effitrain.data.cache import ContentHash, dataset_content_hash
    from effitrain.data.packing import tokenizer_fingerprint
    from effitrain.data.repack import cached_arrays, pack_stream, tokenize_documents

    key = ContentHash("in_context", _VERSION, dataset_content_hash(documents, ("text", "domain")),
                      tokenizer_fingerprint(tokenizer), seq_len,
                      *sorted((k, repr(v)) for k, v in settings.items())).hexdigest()

    def build() -> dict[str, np.ndarray]:
        texts = documents["text"]
        _, vectors, embedding = embed_documents(texts, n_features=settings["n_features"],
                                                embed_dims=settings["embed_dims"])
        order, path_of, _ = chain_order(in_batches(vectors), len(texts), embedding.dims, texts,
                                        neighbors=settings["neighbors"], index=settings["index"],
                                        nprobe=settings["nprobe"], dedup_threshold=settings["dedup_threshold"])
        ids = tokenize_documents([texts[i] for i in order.tolist()], tokenizer)
        packed = pack_stream(ids, seq_len)
        domains = np.asarray(documents["domain"], dtype=str)[order[packed["first_doc"]]]
        return {"rows": packed["rows"], "domain": domains, "order": order, "path": path_of}

    return cached_arrays("in_context", key, build)


class InContextSampler(ShuffleSampler):
    """Shuffled contexts over the chain-packed rows (``train_rows``, which the loop gathers from)."""

    def __init__(self, chained: dict[str, Any], **layout: Any) -> None:
        # rows None: the run's own train rows are the chains (token shards packed by the data engine)
        self.train_rows = chained["rows"]
        self.domains = chained["domain"]
        self.document_order = chained["order"]
        super().__init__(len(self.train_rows) if self.train_rows is not None else int(chained["n"]), **layout)


def build_in_context(params: Any, packed: Any, *, seed: int, micro_batch_size: int, grad_accum: int,
                     world_size: int, rank: int, documents: Any = None, tokenizer: Any = None) -> InContextSampler:
    """The ``curriculum: in_context`` builder (``packed`` gives the sequence length; the rows are re-packed)."""
    layout = {"seed": seed, "micro_batch_size": micro_batch_size, "grad_accum": grad_accum,
              "world_size": world_size, "rank": rank}
    if getattr(packed, "packed_order", None) == "in_context":  # token shards the data engine packed in chain order
        return InContextSampler({"rows": None, "domain": packed.domains(), "order": None, "n": len(packed)},
                                **layout)
    if documents is None or tokenizer is None:
        raise ConfigError("curriculum: 'in_context' needs the training documents and the tokenizer")
    seq_len = int(packed.features["input_ids"].length)
    chained = chained_rows(documents, tokenizer, seq_len, **chain_settings(params))
    if len(chained["rows"]) == 0:
        raise ConfigError(f"dataset.seq_len: the chained documents make less than one sequence of {seq_len} tokens")
    return InContextSampler(chained, **layout)
