"""Per-device memory of a run, estimated from its config alone: no torch, no model built, answers in milliseconds.

The categories are those that :mod:`effitrain.memory` measures on the live tensors after a run
(``parameter_bytes``, ``gradient_bytes``, ``optimizer_state_bytes``, ``master_weight_bytes``), plus two that a
live-tensor walk cannot see: the activations kept for the backward pass of one micro-batch, and DeepSpeed's
gradient-reduction bucket.  How each is counted, and where the counts come from:

* **parameters**: every weight of the model's shape (:mod:`effitrain.planner.shapes`), 4 bytes in fp32 and 2 in
  bf16/fp16; ZeRO-3 keeps 1/world of them per device (``offload_param=cpu``: on the host).
* **gradients**: one per *trainable* parameter in the parameters' dtype.  ZeRO-2/3 keep only this rank's 1/world
  partition; DeepSpeed's bf16 optimizer (ZeRO-0) also keeps an fp32 accumulator.  With ``offload_optimizer=cpu``
  the partition lives on the host.
* **optimizer state**: per optimizer, the tensors it allocates per trainable tensor (AdamW: m and v in fp32 plus a
  4-byte step; 8-bit AdamW: one byte per moment plus an fp32 absmax per 256-element block; the GaLore family and
  APOLLO: moments of shape rank x max(m, n) plus the projector; Adam-mini: m plus one v per block).  ZeRO-1/2/3
  hand the optimizer one flat partition of 1/world of the trainable parameters per rank.
* **master weights**: an fp32 copy of the trainable parameters when they are bf16/fp16, and under ZeRO-1/2/3 always
  (DeepSpeed clones its flat fp32 partition even in fp32 runs); 1/world of them under ZeRO.
* **reduction bucket**: ZeRO-1/2 allocate ``reduce_bucket_size`` gradient elements for reduction (two with
  ``overlap_comm``), whatever the model's size (DeepSpeed's ``setup_buckets``).  On CPU no bucket was found alive
  right after the backward pass, so this is an upper bound for a transient of the backward pass.
* **activations**: the tensors autograd saves per micro-batch (see :func:`activation_bytes`), from the model's
  dimensions, ``dataset.seq_len`` and ``train.micro_batch_size``; activation checkpointing keeps each layer's input
  and recomputes one layer at a time.

What the estimates were checked against is in docs/benchmarks.md ("Memory planner"), made by
``scripts/bench_memory_planner.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from effitrain.planner.shapes import ModelShape, layer_index, numel, shape_from_block
from effitrain.registry import ConfigError

GIB = 2 ** 30
#: bitsandbytes' block size for the block-wise quantised optimizer states (one fp32 absmax per block)
BNB_BLOCK = 256
#: DeepSpeed-CPU's ``precision=auto`` picks bf16 where supported; a plan without a device assumes a GPU that has it
AUTO_PRECISION = "bf16"


@dataclass
class Setup:
    """Everything the estimate depends on, read from a validated :class:`~effitrain.config.spec.RunSpec`."""
    shape: ModelShape
    precision: str                 # fp32, bf16 or fp16
    world: int
    zero_stage: int
    offload_optimizer: bool
    offload_param: bool
    reduce_bucket_size: int
    overlap_comm: bool
    micro_batch: int
    seq_len: int
    checkpointing: bool
    eager_attention: bool
    optimizer: str
    optimizer_params: Any
    peft: str
    peft_params: Any
    lisa_active_layers: Optional[int] = None
    sequence_parallel: int = 1     # DeepSpeed-Ulysses: processes sharing each sequence (each keeps seq_len / sp)
    notes: list[str] = field(default_factory=list)


@dataclass
class Line:
    key: str          # the name effitrain.memory uses where it measures the same thing
    label: str
    device: int
    host: int = 0
    how: str = ""


@dataclass
class Plan:
    setup: Setup
    lines: list[Line]
    total_params: int
    trainable_params: int

    @property
    def device_bytes(self) -> int:
        return sum(l.device for l in self.lines)

    @property
    def host_bytes(self) -> int:
        return sum(l.host for l in self.lines)

    def get(self, key: str) -> Line:
        return next(l for l in self.lines if l.key == key)

    def verdict(self, device_gib: float) -> str:
        need, have = self.device_bytes / GIB, device_gib
        if self.device_bytes <= device_gib * GIB:
            return f"verdict: fits: {need:.2f} GiB of {have:g} GiB per device ({100 * need / have:.0f}%)"
        return (f"verdict: does not fit: {need:.2f} GiB per device > {have:g} GiB; "
                f"{'; '.join(self.suggestions()) or 'use a larger device'}")

    def suggestions(self) -> list[str]:
        s, out = self.setup, []
        biggest = max(self.lines, key=lambda l: l.device)
        if biggest.key == "activation_bytes" and not s.checkpointing:
            out.append("model.gradient_checkpointing=true")
        if biggest.key == "activation_bytes" or s.micro_batch > 1:
            out.append("a smaller train.micro_batch_size (with a larger train.grad_accum)")
        if s.zero_stage < 3:
            out.append(f"parallelism=zero{min(s.zero_stage + 1, 3)}" + (" on more devices" if s.world == 1 else ""))
        if not s.offload_optimizer and s.zero_stage >= 1:
            out.append("offload_optimizer=cpu")
        return out


def setup_from_spec(spec: Any, *, world: int) -> Setup:
    model = spec.block("model")
    par = spec.block("parallelism").params
    precision = spec.block("precision").name
    notes = []
    if precision == "auto":
        precision = AUTO_PRECISION
        notes.append("precision=auto is planned as bf16 (what a GPU with bf16 picks); set precision= to choose")
    lisa = next((m.params for m in spec.methods.values() if m.name == "lisa"), None)
    stage = getattr(par, "stage", 0) or 0
    return Setup(
        shape=shape_from_block(model.name, model.params), precision=precision, world=world, zero_stage=stage,
        offload_optimizer=getattr(par, "offload_optimizer", "none") not in (None, "none"),
        offload_param=getattr(par, "offload_param", "none") not in (None, "none"),
        reduce_bucket_size=int(getattr(par, "reduce_bucket_size", 0) or 0) if stage in (1, 2) else 0,
        overlap_comm=bool(getattr(par, "overlap_comm", False)),
        micro_batch=spec.train.micro_batch_size, seq_len=spec.block("dataset").params.seq_len,
        checkpointing=bool(getattr(model.params, "gradient_checkpointing", False)),
        eager_attention=getattr(model.params, "attn_implementation", "sdpa") == "eager",
        optimizer=spec.block("optimizer").name, optimizer_params=spec.block("optimizer").params,
        peft=spec.block("peft").name, peft_params=spec.block("peft").params,
        lisa_active_layers=lisa.active_layers if lisa is not None else None,
        sequence_parallel=int(getattr(par, "sequence_parallel_size", 1) or 1), notes=notes)


# ------------------------------------------------------------------------------------------------ trainable subset
def _module_of(name: str) -> str:
    return name.rsplit(".", 1)[0]


def _targets(module: str, targets: list[str]) -> bool:
    """peft's rule for a list of names: the module's name is one of them or ends with ``.NAME``."""
    return any(module == t or module.endswith("." + t) for t in targets)


def trainable_tensors(s: Setup) -> tuple[list[tuple[str, tuple[int, ...]]], int]:
    """(the trainable tensors with their shapes, the number of frozen base parameters)."""
    params = s.shape.parameters()
    total = sum(numel(shape) for _, shape in params)
    if s.peft == "none":
        if s.lisa_active_layers is None:
            return params, 0
        # LISA: embeddings, final norm and head always train, plus `active_layers` decoder layers at a time (the
        # optimizer state of a layer that leaves the active set is dropped); layers are alike, so layer 0 stands
        # for whichever are active.
        kept = [(n, sh) for n, sh in params if layer_index(n) is None or layer_index(n) < s.lisa_active_layers]
        return kept, total - sum(numel(sh) for _, sh in kept)
    p = s.peft_params
    weights = [(n, sh) for n, sh in params if n.endswith(".weight") and len(sh) == 2]
    adapters: list[tuple[str, tuple[int, ...]]] = []
    if s.peft in ("lora", "pissa", "dora"):
        for name, (out_dim, in_dim) in weights:
            module = _module_of(name)
            if _targets(module, list(p.target_modules)):
                adapters += [(module + ".lora_A.weight", (p.r, in_dim)), (module + ".lora_B.weight", (out_dim, p.r))]
                if s.peft == "dora":
                    adapters.append((module + ".lora_magnitude_vector", (out_dim,)))
    elif s.peft == "ia3":
        for name, (out_dim, in_dim) in weights:
            module = _module_of(name)
            if _targets(module, list(p.target_modules)):
                ff = _targets(module, list(p.feedforward_modules))
                adapters.append((module + ".ia3_l", (in_dim if ff else out_dim,)))
    else:
        raise ConfigError(f"check --memory: peft={s.peft} is not modelled by the planner yet; it knows peft=none, "
                          f"lora, dora, pissa and ia3")
    saved = [(n + ".modules_to_save", sh) for n, sh in params
             if _targets(_module_of(n), list(getattr(p, "modules_to_save", []) or []))]
    return adapters + saved, total


# ------------------------------------------------------------------------------------------------ optimizer state
def _galore_like(s: Setup, tensors: list[tuple[str, tuple[int, ...]]]) -> int:
    """Moments of rank x max(m, n) and a min(m, n) x rank projector per targeted 2-D weight (GaLore 2403.03507,
    APOLLO's random projection has the same size); AdamW's state for every other tensor."""
    p = s.optimizer_params
    moment_bytes = 1 if getattr(p, "state_bits", 32) == 8 else 4
    history = getattr(p, "history", 0) if s.optimizer == "natural_galore" else 0
    total = 0
    bases: set[int] = set()
    for name, shape in tensors:
        targeted = len(shape) == 2 and any(t in name for t in p.target_modules)
        if not targeted:
            total += 8 * numel(shape) + 4
            continue
        small, large = min(shape), max(shape)
        r = min(p.rank, small)
        total += 2 * r * large * moment_bytes + 4
        if moment_bytes == 1:  # one fp32 absmax per block of each 8-bit moment
            total += 2 * 4 * math.ceil(r * large / BNB_BLOCK)
        total += history * r * large * 4
        if s.optimizer == "dct_lowrank":
            bases.add(small)   # one DCT basis per size, shared by every weight of that size
            total += r * 8     # the chosen column indices (int64)
        else:
            total += small * r * 4
    return total + sum(4 * n * n for n in bases)


def _adamw_8bit(s: Setup, tensors: list[tuple[str, tuple[int, ...]]]) -> int:
    """bitsandbytes AdamW8bit: two uint8 moments and an fp32 absmax per 256-element block for tensors of at least
    ``min_8bit_size`` elements (the quantile maps are shared); fp32 moments for the smaller ones."""
    minimum = s.optimizer_params.min_8bit_size
    total, quantised = 0, False
    for _, shape in tensors:
        n = numel(shape)
        if n >= minimum:
            total += 2 * n + 2 * 4 * math.ceil(n / BNB_BLOCK)
            quantised = True
        else:
            total += 8 * n
    return total + (2 * 256 * 4 if quantised else 0)


def _adam_mini(s: Setup, tensors: list[tuple[str, tuple[int, ...]]]) -> int:
    """Adam-mini (2406.16793, release 1.1.1): m for every element, one v per head (q, k), per output row (v, o,
    MLP, embedding and head) and per norm."""
    total = 0
    heads = {"q_proj": s.shape.heads, "k_proj": s.shape.kv_heads}
    for name, shape in tensors:
        module = _module_of(name).rsplit(".", 1)[-1]
        v = heads.get(module) or (shape[0] if len(shape) == 2 else 1)
        total += 4 * numel(shape) + 4 * v + 4
    return total


_EMBEDDING_OR_HEAD = {"model.embed_tokens.weight", "lm_head.weight", "gpt_neox.embed_in.weight", "embed_out.weight"}


def _muon(s: Setup, tensors: list[tuple[str, tuple[int, ...]]]) -> int:
    """Muon (torch.optim.Muon): one fp32 momentum buffer per hidden 2-D weight; AdamW's two moments and step for the
    embedding and the head (the planner's names for them: Llama's and GPT-NeoX's), norms and biases."""
    total = 0
    for name, shape in tensors:
        hidden = len(shape) == 2 and name not in _EMBEDDING_OR_HEAD
        total += 4 * numel(shape) if hidden else 8 * numel(shape) + 4
    return total


def _cosmos(s: Setup, tensors: list[tuple[str, tuple[int, ...]]]) -> int:
    """COSMOS (authors' COSMOS_optim.py): per hidden m x n weight a full momentum (m x n), the second moment in the
    subspace (m x r), the basis (n x r) and its r x r Gram EMA, r = min(rank, n); AdamW's state for the rest."""
    total = 0
    for name, shape in tensors:
        if len(shape) == 2 and name not in _EMBEDDING_OR_HEAD:
            m, n = shape
            r = min(s.optimizer_params.rank, n)
            total += 4 * (m * n + m * r + n * r + r * r) + 4
        else:
            total += 8 * numel(shape) + 4
    return total


OPTIMIZER_STATE = {
    "adamw": lambda s, t: sum(8 * numel(sh) + 4 for _, sh in t),
    "adamw_8bit": _adamw_8bit, "galore": _galore_like, "natural_galore": _galore_like, "apollo": _galore_like,
    "dct_lowrank": _galore_like, "adam_mini": _adam_mini, "muon": _muon, "cosmos": _cosmos,
}


def optimizer_state_bytes(s: Setup, tensors: list[tuple[str, tuple[int, ...]]]) -> int:
    if s.optimizer not in OPTIMIZER_STATE:
        raise ConfigError(f"check --memory: optimizer={s.optimizer} is not modelled by the planner; it knows "
                          f"{', '.join(OPTIMIZER_STATE)}")
    if s.zero_stage >= 1:
        # ZeRO hands the optimizer one flat fp32 partition per parameter group and rank
        flat = sum(numel(sh) for _, sh in tensors)
        tensors = [("flat_partition", (math.ceil(flat / s.world),))]
    return OPTIMIZER_STATE[s.optimizer](s, tensors)


# ------------------------------------------------------------------------------------------------ activations
def activation_bytes(s: Setup) -> int:
    """Bytes autograd keeps for the backward pass of one micro-batch of ``micro_batch x seq_len`` tokens.

    Counted per token from what a transformers Llama layer saves (measured with ``saved_tensors_hooks``, see
    docs/benchmarks.md): 5 hidden-sized tensors (the two RMSNorms' inputs and normalised outputs, the residual),
    3 q-sized (rotated q, the attention output and its reshaped copy that o_proj takes), 2 kv-sized (rotated k, v),
    4 intermediate-sized (gate, up, activated gate, their product), the SDPA log-sum-exp per head and the two norms'
    reciprocal RMS; eager attention keeps the scores and probabilities instead (2 x heads x seq_len).  After the
    layers: the final norm's input and output and the head's input (3h), and the loss's fp32 log-softmax over the
    vocabulary (4 bytes x vocab, whatever the precision).  With activation checkpointing the forward keeps each
    layer's input (h) only, and the backward recomputes one layer at a time: its activations are added once.
    Under sequence parallelism a process keeps its slice's tokens (``seq_len / sp``); inside attention it holds the
    whole sequence for ``heads / sp`` heads, the same number of values.
    """
    sh, tokens = s.shape, s.micro_batch * s.seq_len // s.sequence_parallel
    dtype = 4 if s.precision == "fp32" else 2
    per_layer = 5 * sh.hidden + 3 * sh.q_dim + 2 * sh.kv_dim + 4 * sh.intermediate + 2
    per_layer += 2 * sh.heads * s.seq_len if s.eager_attention else sh.heads
    layers = sh.layers * sh.hidden + per_layer if s.checkpointing else sh.layers * per_layer
    head = 3 * sh.hidden * dtype + 4 * sh.vocab
    return tokens * (layers * dtype + head)


# ------------------------------------------------------------------------------------------------ the plan
def plan(s: Setup) -> Plan:
    tensors, frozen = trainable_tensors(s)
    trainable = sum(numel(sh) for _, sh in tensors)
    total = s.shape.count()
    dtype = 4 if s.precision == "fp32" else 2
    world, stage = s.world, s.zero_stage
    part = (lambda n: math.ceil(n / world))

    all_params = total + (trainable if s.peft != "none" else 0)  # adapters come on top of the frozen base
    params = (part(all_params) if stage == 3 else all_params) * dtype
    lines = [Line("parameter_bytes", "parameters", 0 if s.offload_param else params,
                  params if s.offload_param else 0,
                  f"{all_params:,} x {dtype} B" + (" / world (ZeRO-3)" if stage == 3 else ""))]

    grad_elems = part(trainable) if stage >= 2 else trainable
    grads = grad_elems * dtype
    how = f"{trainable:,} trainable x {dtype} B" + (" / world" if stage >= 2 else "")
    if stage == 0 and dtype == 2:
        grads += trainable * 4
        how += " + fp32 accumulator (DeepSpeed bf16 optimizer)"
    on_host = s.offload_optimizer and stage >= 1
    lines.append(Line("gradient_bytes", "gradients", 0 if on_host else grads, grads if on_host else 0, how))

    state = optimizer_state_bytes(s, tensors)
    lines.append(Line("optimizer_state_bytes", "optimizer state", 0 if s.offload_optimizer else state,
                      state if s.offload_optimizer else 0,
                      f"{s.optimizer}" + (f", 1/{world} flat partition (ZeRO-{stage})" if stage else "")))

    master = 0
    if stage >= 1:
        master = part(trainable) * 4
    elif dtype == 2:
        master = trainable * 4
    lines.append(Line("master_weight_bytes", "fp32 master weights", 0 if s.offload_optimizer else master,
                      master if s.offload_optimizer else 0,
                      "fp32 copy" + (" of the 1/world partition" if stage >= 1 else "") if master else "none in fp32"))

    bucket = s.reduce_bucket_size * dtype * (2 if s.overlap_comm else 1) if stage in (1, 2) else 0
    lines.append(Line("reduction_bucket_bytes", "ZeRO reduction bucket", bucket, 0,
                      f"reduce_bucket_size {s.reduce_bucket_size:,} x {dtype} B" if bucket else "none"))
    acts = activation_bytes(s)
    lines.append(Line("activation_bytes", "activations (one micro-batch)", acts, 0,
                      f"{s.micro_batch} x {s.seq_len // s.sequence_parallel} tokens"
                      + (f" (1/{s.sequence_parallel} of each sequence)" if s.sequence_parallel > 1 else "")
                      + (", checkpointed" if s.checkpointing else "")))
    return Plan(s, lines, total, trainable)


def format_plan(p: Plan, device_gib: float) -> str:
    s = p.setup
    head = (f"memory plan: {p.total_params:,} parameters ({p.trainable_params:,} trainable), {s.precision}, "
            f"ZeRO-{s.zero_stage}, world size {s.world}"
            + (", optimizer offloaded to cpu" if s.offload_optimizer else "")
            + (", parameters offloaded to cpu" if s.offload_param else ""))
    width = max(len(l.label) for l in p.lines)
    rows = [head, f"  {'':{width}}  {'per device':>12}  {'host':>10}  how"]
    for l in p.lines:
        rows.append(f"  {l.label:{width}}  {_fmt(l.device):>12}  {_fmt(l.host):>10}  {l.how}")
    rows.append(f"  {'total':{width}}  {_fmt(p.device_bytes):>12}  {_fmt(p.host_bytes):>10}")
    rows += [f"  note: {n}" for n in s.notes]
    rows.append(p.verdict(device_gib))
    return "\n".join(rows)


def _fmt(n: int) -> str:
    if n == 0:
        return "0"
    if n >= GIB:
        return f"{n / GIB:.2f} GiB"
    return f"{n / 2 ** 20:.2f} MiB"
