"""Data-selection methods: typed parameters of the selection presets, their scorers and their selectors.

Selection is split the way the Data Efficacy paper splits it: a **scorer** gives every candidate example a score
(and, for the clustering methods, a cluster label; for dedup, a keep/drop mask), and a **selector** turns the scores
into the chosen set under a **budget**.  Ordering is not selection's business (that is the curriculum block).

A selection YAML names a *preset* (``name: dsir``) that fixes the scorer; the selector defaults to the paper's and may
be swapped for an ablation (``selector: {name: topk}``).  ``name: scored`` combines any scorer with any selector::

    name: dsir
    target: {domain: code, max_examples: 64}    # what the selection should look like
    budget: {fraction: 0.25, unit: tokens}      # keep a quarter of the pool's tokens
    scorer: {name: dsir, num_buckets: 10000}
    selector: {name: gumbel_topk}

Scorer and selector parameters are registered blocks of the groups ``scorer`` and ``selector`` (this module imports
neither torch nor deepspeed; the builders live in ``effitrain.selection``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from effitrain.registry import REGISTRY, Block, ConfigError, param, parse_params, register

# ----------------------------------------------------------------------------------------------------------------
# Shared pieces: the target, the budget, a reference model
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class TargetParams:
    """What the selected data should resemble.  Exactly one of ``domain``, ``path`` or ``dataset``.

    ``domain`` with ``split: train`` (the default) draws ``max_examples`` documents of that domain from the pool's
    train split and **removes them from the candidates**, so the target is held out of training and the eval split
    stays untouched for measuring.  ``split: eval`` takes them from the eval split instead (then target-domain eval
    loss is measured on documents the selection has seen; use it only when the pool is too small to hold out).
    """
    domain: Optional[str] = param(None, help="a domain of the pool (the dataset's `domain` column)")
    split: Literal["train", "eval"] = param("train", help="where domain examples come from (train: held out of the pool)")
    path: Optional[list[str]] = param(None, help="local jsonl / json / parquet / txt files with the target texts")
    dataset: Optional[str] = param(None, help="a `datasets` id (from the local cache when offline)")
    dataset_split: str = param("train", help="split of `dataset`")
    text_field: str = param("text", help="text column of `path` / `dataset`")
    task_field: Optional[str] = param(None, help="column of `path` / `dataset` naming each target example's task "
                                                 "(LESS scores a candidate by its best task); none = one task")
    max_examples: int = param(64, ge=1, help="target examples used (the first ones, shuffled by the seed)")

    def validate(self, path: str) -> None:
        given = [k for k in ("domain", "path", "dataset") if getattr(self, k)]
        if len(given) != 1:
            raise ConfigError(f"{path}: set exactly one of {path}.domain, {path}.path, {path}.dataset "
                              f"(got {', '.join(given) or 'none'})")
        if self.task_field is not None and self.domain is not None:
            raise ConfigError(f"{path}.task_field: a domain target is one task; task_field goes with "
                              f"{path}.path or {path}.dataset")


@dataclass
class BudgetParams:
    """How much of the candidate pool to keep.

    ``unit: tokens`` counts pre-tokenizer word pieces (``\\w+`` runs and single punctuation marks), a count that does
    not depend on the BPE trained later on the selection; examples are taken in the selector's order until the
    running total reaches ``fraction`` of the pool's total (at most one document over).  ``unit: examples`` keeps
    ``round(fraction * N)`` examples.  The pool is the train split after the target hold-out.
    """
    fraction: float = param(0.25, gt=0, le=1, help="share of the pool kept")
    unit: Literal["tokens", "examples"] = param("tokens", help="what the fraction counts")


@dataclass
class _ReferenceModel:
    model_path: Optional[str] = param(None, help="a save_pretrained causal LM folder with its tokenizer")
    max_length: int = param(128, ge=8, help="tokens per example fed to the model")
    batch_size: int = param(16, ge=1, help="examples per forward pass")
    device: Literal["auto", "cpu", "cuda"] = param("auto", help="auto = cuda when available")


@dataclass
class _ProxyModel:
    """A byte-level Llama trained inside the selection stage when no ``model_path`` is given."""
    proxy_hidden_size: int = param(64, ge=8)
    proxy_layers: int = param(2, ge=1)
    proxy_lr: float = param(2e-3, gt=0)
    proxy_batch_size: int = param(16, ge=1)


@dataclass
class _PoolProxy(_ProxyModel):
    """Without ``model_path`` the scorer's reference model is the *pool proxy*: the byte-level Llama trained for
    ``proxy_steps`` random batches of the candidates, cached under the selection cache (keyed by the candidates,
    these parameters and the seed) and shared by every scorer that asks for the same one."""
    proxy_steps: int = param(400, ge=1, help="training steps of the pool proxy (400 x 16 documents = one pass over "
                                             "the demo pool)")


# ----------------------------------------------------------------------------------------------------------------
# Scorers
# ----------------------------------------------------------------------------------------------------------------
# Class attributes (not dataclass fields): NEEDS_TARGET, CLUSTERS (emits cluster labels), VERSION (bump when the
# scorer's arithmetic changes: it is part of the manifest key).


@register("scorer", "uniform", builder="effitrain.selection.scorers.simple:UniformScorer",
          summary="Every example scores 0 (pair with the random selector); free")
@dataclass
class UniformScorerParams:
    NEEDS_TARGET = False
    CLUSTERS = False


@register("scorer", "dsir", builder="effitrain.selection.scorers.dsir:DSIRScorer",
          summary="DSIR log importance weight of hashed unigram+bigram features (target vs pool); 2 passes, CPU")
@dataclass
class DSIRScorerParams:
    VERSION = 3  # 3: each document summed on its own (the sharded path's scores are the same bits)
    NEEDS_TARGET = True
    CLUSTERS = False
    num_buckets: int = param(10000, ge=16, help="hash buckets of the n-gram features (paper: 10000)")
    ngram: int = param(2, ge=1, le=3, help="1 = unigrams, 2 = unigrams+bigrams (paper), 3 = +trigrams")
    lowercase: bool = param(True, help="lower-case before tokenizing (paper: yes)")
    target_smoothing: float = param(0.0, ge=0, help="pseudo-count added to every bucket of the target counts "
                                    "(paper's target_laplace_smoothing, default 0); the pool gets none")
    pool_mix: float = param(0.0, ge=0, lt=1, help="our addition, not the paper's: mix this share of the pool "
                            "distribution into the target's, bounding the penalty of n-grams a small target never "
                            "shows (0 = exactly the paper's estimate)")
    min_length: int = param(100, ge=0, help="drop documents with fewer word/punctuation tokens "
                            "(paper's min_example_length: 100)")
    length_normalize: bool = param(False, help="divide the log weight by the feature count (off in the paper)")


@register("scorer", "zip_fit", builder="effitrain.selection.scorers.zip_fit:ZipFitScorer",
          summary="ZIP-FIT: 1 - mean gzip normalized compression distance to target examples; N x T compressions")
@dataclass
class ZipFitScorerParams:
    VERSION = 2
    NEEDS_TARGET = True
    CLUSTERS = False
    max_target: int = param(32, ge=1, help="target examples compared against each candidate")
    max_chars: int = param(2000, ge=16, help="characters of each text compressed")
    level: int = param(9, ge=1, le=9, help="gzip compression level (gzip's default 9)")


@register("scorer", "perplexity", builder="effitrain.selection.scorers.lm:PerplexityScorer",
          summary="Mean token loss under a reference model (score = loss), or SALT's median loss over the tokens in "
                  "its top-k; one forward pass per example")
@dataclass
class PerplexityScorerParams(_ReferenceModel, _PoolProxy):
    VERSION = 2
    NEEDS_TARGET = False
    CLUSTERS = False
    statistic: Literal["mean", "topk_median"] = param(
        "mean", help="mean: the example's mean token loss; topk_median: the median loss over the tokens whose true "
                     "token is among the reference's top_k predictions (SALT's Eq. 10: hard yet learnable; NaN, "
                     "ranked last, when there is none)")
    top_k: int = param(10, ge=1, help="statistic=topk_median: a token counts when the reference ranks it in its "
                                      "top_k (SALT: 10)")


@register("scorer", "embedding_kmeans", builder="effitrain.selection.scorers.lm:EmbeddingKMeansScorer",
          summary="k-means clusters of mean-pooled reference-model hidden states; one forward pass per example")
@dataclass
class EmbeddingKMeansScorerParams(_ReferenceModel, _PoolProxy):
    VERSION = 2
    NEEDS_TARGET = False
    CLUSTERS = True
    num_clusters: int = param(8, ge=2)
    layer: int = param(-1, help="hidden-state layer (-1 = last)")
    normalize: bool = param(True, help="L2-normalize embeddings before k-means (spherical k-means)")


@register("scorer", "ifd_kmeans", builder="effitrain.selection.scorers.ifd:IFDKMeansScorer",
          summary="CodeACT's CDAS: instruction-following difficulty per example and k-means clusters of the "
                  "instructions; three forward passes per example")
@dataclass
class IFDKMeansScorerParams(_ReferenceModel, _PoolProxy):
    VERSION = 1
    NEEDS_TARGET = False
    CLUSTERS = True
    num_clusters: int = param(10, ge=2, help="k of k-means (the authors' select_data.py: 10)")
    kmeans_seed: int = param(42, help="k-means random_state (the authors': 42)")
    layer: int = param(-1, help="hidden-state layer of the instruction embedding (-1 = last)")
    ratio: Literal["perplexity", "loss"] = param("perplexity", help="IFD as PPL(answer|instruction)/PPL(answer) "
                                                 "(the authors' code) or as the ratio of the mean losses")
    max_ifd: Optional[float] = param(1.0, gt=0, help="drop examples with IFD >= this (the authors: 1.0); null "
                                                     "keeps all")


@register("scorer", "loss_trajectory", builder="effitrain.selection.scorers.s2l:LossTrajectoryScorer",
          summary="S2L: per-example training-loss trajectories of a small proxy trained epochs over the pool, "
                  "k-means per domain; epochs x N/batch train steps + (checkpoints x N) forward passes")
@dataclass
class LossTrajectoryScorerParams(_ReferenceModel, _ProxyModel):
    VERSION = 2
    NEEDS_TARGET = False
    CLUSTERS = True
    proxy_batch_size: int = param(32, ge=1, help="examples per proxy update (paper: 4 x 8 accumulation = 32)")
    proxy_epochs: int = param(3, ge=1, help="passes of the proxy over the whole pool (paper: 3)")
    proxy_schedule: Literal["constant", "linear", "cosine"] = param("cosine", help="LR schedule (paper: cosine)")
    proxy_warmup_ratio: float = param(0.03, ge=0, lt=1, help="share of the steps warming the LR up (paper: 0.03)")
    checkpoints: int = param(6, ge=2, help="points of each training-loss trajectory, evenly spaced over the run")
    num_clusters: int = param(10, ge=2, help="k-means clusters per domain (paper: 100 per source)")
    per_domain: bool = param(True, help="cluster each domain (S2L's data source) separately")


@register("scorer", "less", builder="effitrain.selection.scorers.less:LESSScorer",
          summary="LESS: Adam-preconditioned LoRA gradients of warm-up checkpoints, projected, cosine to the "
                  "target's; checkpoints x (one backward pass per example)")
@dataclass
class LESSScorerParams(_ReferenceModel, _PoolProxy):
    VERSION = 2
    NEEDS_TARGET = True
    CLUSTERS = False
    warmup_fraction: float = param(0.05, gt=0, le=1, help="share of the pool the LoRA warm-up trains on (paper: 5%)")
    warmup_epochs: int = param(4, ge=1, help="warm-up epochs; one checkpoint at the end of each (paper: 4)")
    warmup_batch_size: int = param(32, ge=1, help="examples per warm-up update (paper: 1 x 32 accumulation)")
    warmup_lr: float = param(2e-3, gt=0, help="peak LR of the warm-up (paper: 2e-5 on Llama-2-7B)")
    warmup_schedule: Literal["constant", "linear", "cosine"] = param("linear", help="paper: linear")
    warmup_ratio: float = param(0.03, ge=0, lt=1, help="share of warm-up steps ramping the LR up (paper: 0.03)")
    lora_r: int = param(8, ge=1)
    lora_alpha: int = param(32, ge=1)
    lora_dropout: float = param(0.1, ge=0, lt=1, help="during the warm-up (paper: 0.1)")
    lora_targets: list[str] = param(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
                                    help="module names given LoRA (paper: q, k, v, o)")
    proj_dim: int = param(1024, ge=8, help="random projection size of the gradient features (paper: 8192)")
    max_target: int = param(32, ge=1, help="target examples whose gradients are compared")
    adam_betas: list[float] = param(default_factory=lambda: [0.9, 0.999], help="of the warm-up AdamW (torch default)")
    adam_eps: float = param(1e-8, gt=0, help="added under the square root of the preconditioner (as LESS's code)")

    def validate(self, path: str) -> None:
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ConfigError(f"{path}.adam_betas: two numbers in [0, 1), got {self.adam_betas}")


@dataclass
class _Embeddings:
    """How documents become vectors (:mod:`effitrain.selection.embeddings`): one layer's pooled hidden states."""
    layer: int = param(-1, help="hidden-state layer (-1 = last)")
    pooling: Literal["mean", "position_weighted", "last"] = param(
        "mean", help="mean: every token alike; position_weighted: token t weighs t / sum(1..len) (RDS+, after SGPT); "
                     "last: the last real token's state (INGENIOUS)")


@register("scorer", "rds_plus", builder="effitrain.selection.scorers.rds:RDSPlusScorer",
          summary="RDS+: position-weighted mean-pooled hidden states, cosine to the target (max per task), "
                  "round-robin over target tasks; one forward pass per example")
@dataclass
class RDSPlusScorerParams(_ReferenceModel, _PoolProxy, _Embeddings):
    NEEDS_TARGET = True
    CLUSTERS = False
    pooling: Literal["mean", "position_weighted", "last"] = param(
        "position_weighted", help="RDS+: position_weighted (the authors' weighted_mean); mean is their ablation")
    task_reduce: Literal["max", "mean"] = param("max", help="a candidate's score within a task: its best (RDS+: "
                                                            "max) or mean cosine over the task's examples")


@register("scorer", "facility_location", builder="effitrain.selection.scorers.submodular:FacilityLocationScorer",
          summary="INGENIOUS: facility location over pooled hidden states, lazy greedy in random partitions, budget "
                  "shared in proportion; one forward pass per example + partition_size^2 per partition")
@dataclass
class FacilityLocationScorerParams(_ReferenceModel, _PoolProxy, _Embeddings):
    NEEDS_TARGET = False
    CLUSTERS = False
    partition_size: int = param(1000, ge=2, help="documents per partition; the similarity matrix is this squared "
                                                 "(paper: the corpus cut into 5000 partitions)")
    partition_strategy: Literal["random", "kmeans"] = param("random", help="random chunks (paper's default) or "
                                                                           "k-means clusters of the embeddings")
    pooling: Literal["mean", "position_weighted", "last"] = param(
        "last", help="INGENIOUS: the last real token's hidden state")
    sampling: Literal["taylor_softmax", "greedy"] = param(
        "taylor_softmax", help="taylor_softmax: each partition's share is drawn without replacement with "
                               "probabilities taylor_softmax(gain / temperature) over the greedy picks (the authors' "
                               "script); greedy: the greedy order's prefix")
    temperature: float = param(1.0, gt=0, help="divides the gains before the Taylor softmax (authors: 1.0)")


@register("scorer", "got_d", builder="effitrain.selection.scorers.got_d:GOTDScorer",
          summary="GOT-D: gradient of the entropic OT distance (candidates -> target embeddings) w.r.t. each "
                  "candidate's mass, most negative first; one forward pass per example + Sinkhorn on N x T")
@dataclass
class GOTDScorerParams(_ReferenceModel, _PoolProxy, _Embeddings):
    NEEDS_TARGET = True
    CLUSTERS = False
    normalize: bool = param(True, help="L2-normalize the embeddings (the squared-Euclidean cost is then 2 - 2 cos)")
    epsilon: float = param(0.1, gt=0, help="entropic regularization of the OT (authors: 0.1)")
    max_iterations: int = param(5000, ge=1, help="Sinkhorn iterations at most (authors: 2000 with momentum 1.3)")
    tolerance: float = param(1e-7, gt=0, help="Sinkhorn stops when the marginal error is below this")


@register("scorer", "minhash_dedup", builder="effitrain.selection.scorers.dedup:DedupScorer",
          summary="Exact (normalized text hash) + MinHash-LSH near-duplicates; keeps the first of each group")
@dataclass
class DedupScorerParams:
    NEEDS_TARGET = False
    CLUSTERS = False
    exact: bool = True
    near: bool = True
    threshold: float = param(0.8, gt=0, lt=1, help="Jaccard similarity above which two documents are duplicates")
    num_perm: int = param(128, ge=16, help="MinHash permutations")
    shingle: Literal["word", "char"] = "word"
    shingle_size: int = param(5, ge=1, help="n of the n-gram shingles")


@register("scorer", "quality_classifier", builder="effitrain.selection.scorers.quality:QualityClassifierScorer",
          summary="Log-odds of a hashed n-gram logistic regression trained on target (1) vs pool sample (0)")
@dataclass
class QualityClassifierScorerParams:
    NEEDS_TARGET = True
    CLUSTERS = False
    n_features: int = param(2 ** 18, ge=64, help="hashing-vectorizer width")
    ngram_max: int = param(2, ge=1, le=3, help="word n-grams 1..ngram_max")
    negatives: int = param(1000, ge=1, help="pool examples sampled as the negative class")
    C: float = param(1.0, gt=0, help="inverse L2 regularization of the logistic regression")


# ----------------------------------------------------------------------------------------------------------------
# Selectors
# ----------------------------------------------------------------------------------------------------------------


@register("selector", "random", builder="effitrain.selection.selectors:RandomSelector",
          summary="Uniformly random examples up to the budget")
@dataclass
class RandomSelectorParams:
    NEEDS_CLUSTERS = False


@register("selector", "topk", builder="effitrain.selection.selectors:TopKSelector",
          summary="Best scores first up to the budget")
@dataclass
class TopKSelectorParams:
    NEEDS_CLUSTERS = False
    descending: bool = param(True, help="true = highest scores first")


@register("selector", "gumbel_topk", builder="effitrain.selection.selectors:GumbelTopKSelector",
          summary="Importance resampling without replacement: top-k of score/T + Gumbel noise (scores = log weights)")
@dataclass
class GumbelTopKSelectorParams:
    NEEDS_CLUSTERS = False
    temperature: float = param(1.0, gt=0, help="divides the log weights; large = closer to random")


@register("selector", "band", builder="effitrain.selection.selectors:BandSelector",
          summary="Keep scores between two quantiles, then random up to the budget")
@dataclass
class BandSelectorParams:
    NEEDS_CLUSTERS = False
    low: float = param(0.1, ge=0, le=1, help="lower quantile of the kept band")
    high: float = param(0.9, ge=0, le=1, help="upper quantile of the kept band")

    def validate(self, path: str) -> None:
        if self.low >= self.high:
            raise ConfigError(f"{path}.low: {self.low} must be below {path}.high={self.high}")


@register("selector", "window", builder="effitrain.selection.selectors:WindowSelector",
          summary="One contiguous window of the sorted scores holding the budget (low / medium / high)")
@dataclass
class WindowSelectorParams:
    NEEDS_CLUSTERS = False
    position: Literal["low", "medium", "high"] = param("medium", help="where the window sits among the sorted "
                                                                      "scores (perplexity: bottom / middle / top)")


@register("selector", "cluster_balanced", builder="effitrain.selection.selectors:ClusterBalancedSelector",
          summary="Equal share of the budget per cluster, smallest clusters first, leftovers passed on")
@dataclass
class ClusterBalancedSelectorParams:
    NEEDS_CLUSTERS = True
    within: Literal["random", "score"] = param("random", help="order inside a cluster")
    per_source: bool = param(False, help="first share the budget equally over the scorer's groups (S2L: sources)")
    min_cluster_size: int = param(1, ge=1, help="clusters with fewer examples only fill what the others cannot "
                                                "(S2L: 3, i.e. size > 2)")


@register("selector", "cluster_proportional", builder="effitrain.selection.selectors:ClusterProportionalSelector",
          summary="The same share of every cluster, highest scores first (CodeACT: top-IFD fraction per cluster)")
@dataclass
class ClusterProportionalSelectorParams:
    NEEDS_CLUSTERS = True


# ----------------------------------------------------------------------------------------------------------------
# Selection presets (the `selection` group)
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ScoredSelection:
    """Any scorer with any selector.  The presets below fix the scorer and default the selector."""
    PRESET_SCORER = None      # scorer name fixed by a preset (None = free)
    DEFAULT_SELECTOR = None   # selector used when `selector` is omitted

    scorer: dict[str, Any] = param(default_factory=dict, help="scorer block: {name: ..., params}")
    selector: dict[str, Any] = param(default_factory=dict, help="selector block: {name: ..., params}")
    # A mapping checked in validate() (not Optional[TargetParams]: a union would hide which target key is wrong).
    target: Optional[dict[str, Any]] = param(None, help="target data (TargetParams; needed by dsir, zip_fit, less, "
                                                        "quality_classifier)")
    budget: BudgetParams = param(default_factory=BudgetParams)
    # continual pre-training selects a subset of the new domain next to whole general data (cpt_stability_gap)
    domains: Optional[list[str]] = param(None, help="select only among the pool's documents of these domains (the "
                                         "budget is a fraction of them); documents of the other domains are all kept")
    num_proc: int = param(1, ge=1, help="worker processes for the batched feature passes (datasets.map)")
    batch_size: int = param(512, ge=1, help="examples per datasets.map batch")
    cache: bool = param(True, help="reuse a manifest written for the same pool, target, method and parameters")

    def named_domains(self, path: str) -> list[tuple[str, str]]:
        named = [(f"{path}.domains", d) for d in self.domains or []]
        if self.target is not None and self.target.domain is not None:
            named.append((f"{path}.target.domain", self.target.domain))
        return named

    def validate(self, path: str) -> None:
        if self.target is not None and not isinstance(self.target, TargetParams):
            self.target = parse_params(TargetParams, self.target, f"{path}.target")
        scorer = dict(self.scorer)
        if self.PRESET_SCORER is not None:
            scorer.setdefault("name", self.PRESET_SCORER)
            if scorer["name"] != self.PRESET_SCORER:
                raise ConfigError(f"{path}.scorer.name: preset uses scorer '{self.PRESET_SCORER}', got "
                                  f"'{scorer['name']}'; use `name: scored` to combine a scorer and a selector freely")
        selector = dict(self.selector)
        if self.DEFAULT_SELECTOR is not None:
            selector.setdefault("name", self.DEFAULT_SELECTOR)
        self.scorer_block: Block = REGISTRY.parse("scorer", scorer, f"{path}.scorer")
        self.selector_block: Block = REGISTRY.parse("selector", selector, f"{path}.selector")
        self.scorer = {"name": self.scorer_block.name, **_plain(self.scorer_block.params)}
        self.selector = {"name": self.selector_block.name, **_plain(self.selector_block.params)}
        if self.domains is not None and not self.domains:
            raise ConfigError(f"{path}.domains: expected a non-empty list of the pool's domains, or null for all")
        sp = self.scorer_block.params
        if getattr(sp, "NEEDS_TARGET", False) and self.target is None:
            raise ConfigError(f"{path}.target: scorer '{self.scorer_block.name}' needs target data; set "
                              f"{path}.target.domain (or .path / .dataset)")
        if getattr(self.selector_block.params, "NEEDS_CLUSTERS", False) and not getattr(sp, "CLUSTERS", False):
            raise ConfigError(f"{path}.selector.name: '{self.selector_block.name}' needs a scorer that emits "
                              f"clusters (embedding_kmeans, loss_trajectory, ifd_kmeans), not "
                              f"'{self.scorer_block.name}'")


def _plain(params: Any) -> dict[str, Any]:
    import dataclasses
    return {f.name: getattr(params, f.name) for f in dataclasses.fields(params)}


_BUILDER = "effitrain.selection.pipeline:build_scored"


def _preset(name: str, scorer: Optional[str], selector: Optional[str], summary: str) -> type:
    cls = type(f"{name.title().replace('_', '')}Selection", (ScoredSelection,),
               {"PRESET_SCORER": scorer, "DEFAULT_SELECTOR": selector, "__doc__": summary,
                "__module__": __name__})
    cls = dataclass(cls)
    register("selection", name, builder=_BUILDER, summary=summary)(cls)
    globals()[cls.__name__] = cls
    return cls


_preset("scored", None, None, "Any registered scorer with any selector (both required)")
_preset("random", "uniform", "random", "Uniformly random examples up to the budget (the baseline of every method)")
_preset("dsir", "dsir", "gumbel_topk",
        "DSIR (2302.03169): hashed-n-gram importance weights vs the target, resampled without replacement")
_preset("zip_fit", "zip_fit", "topk", "ZIP-FIT (2410.18194): gzip compression alignment with the target, top-k")
_preset("perplexity", "perplexity", "window",
        "Perplexity filtering (2405.20541): reference-model loss, one contiguous window of the sorted losses")
_preset("diversity_kmeans", "embedding_kmeans", "cluster_balanced",
        "Diversify and Conquer: k-means on reference-model embeddings, cluster-balanced sampling")
_preset("s2l", "loss_trajectory", "cluster_balanced",
        "S2L (2403.07384): clusters of small-proxy loss trajectories, balanced sampling")
_preset("codeact", "ifd_kmeans", "cluster_proportional",
        "CodeACT's CDAS (2408.02193): k-means over instructions, the top-IFD share of every cluster")
_preset("less", "less", "topk", "LESS (2402.04333): LoRA-gradient cosine similarity to the target, top-k")
_preset("rds_plus", "rds_plus", "topk",
        "RDS+ (2503.01807): position-weighted pooled hidden-state cosine to the target, round-robin over tasks")
_preset("ingenious", "facility_location", "topk",
        "INGENIOUS (2305.06677): facility-location greedy over embeddings in random partitions, proportional budget")
_preset("got_d", "got_d", "topk",
        "GOT-D (2405.02774): candidates whose mass most lowers the OT distance to the target, top-k")
_preset("dedup", "minhash_dedup", "random", "Exact + MinHash near-duplicate removal (then random up to the budget)")
_preset("quality_classifier", "quality_classifier", "topk",
        "PreSelect / BETR style: a classifier of target vs pool, top-k by log-odds")
