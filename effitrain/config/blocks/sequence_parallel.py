"""Rules of DeepSpeed-Ulysses sequence parallelism (``parallelism.sequence_parallel_size``), torch-free.

Ulysses (arXiv 2309.14509; DeepSpeed ``runtime/sequence_parallel/ulysses_sp.py``) splits every sequence over
``sp`` processes; inside attention an all-to-all swaps the split from the sequence to the heads, so each process
attends over the whole sequence for ``heads / sp`` heads.  That fixes what the configuration must satisfy, checked
here in the order a user would fix them.  The sharding itself is in ``effitrain.parallel.ulysses``; the
objective that splits a batch and combines the slices' losses is ``causal_lm``, so the others are refused.
"""

from __future__ import annotations

from effitrain.config.rules import rule

#: the objectives that know how to train on a slice of each sequence
SEQUENCE_PARALLEL_OBJECTIVES = ("causal_lm",)


def _shape_problem(spec, env) -> str | None:
    sp = spec.block("parallelism").params.sequence_parallel_size
    model = spec.block("model").params
    if env.world_size is not None and env.world_size % sp:
        return f"the world size {env.world_size} is not divisible by sequence_parallel_size={sp}"
    heads = getattr(model, "num_heads", None)
    kv = getattr(model, "num_kv_heads", None) or heads
    if heads is not None and heads % sp:
        return f"model.num_heads={heads} is not divisible by sequence_parallel_size={sp} (each process takes heads/sp)"
    if kv is not None and kv % sp and sp % kv:
        return (f"model.num_kv_heads={kv} and sequence_parallel_size={sp}: one must divide the other "
                f"(Ulysses splits or replicates the key/value heads)")
    seq_len = getattr(spec.block("dataset").params, "seq_len", None)
    if seq_len is not None and seq_len % sp:
        return f"dataset.seq_len={seq_len} is not divisible by sequence_parallel_size={sp}"
    if getattr(model, "attn_implementation", None) == "eager":
        return "model.attn_implementation=eager builds a full 4-D mask, which Ulysses drops; use sdpa"
    if getattr(model, "arch", None) == "gpt_neox":
        return "gpt_neox has no num_key_value_heads, which DeepSpeed's Ulysses wrapper reads; use a llama/qwen2/mistral arch"
    objective = spec.block("objective").name
    if objective not in SEQUENCE_PARALLEL_OBJECTIVES:
        return (f"objective={objective} scores whole sequences, not slices of them; sequence parallelism trains with "
                f"objective={' or '.join(SEQUENCE_PARALLEL_OBJECTIVES)}")
    return None


@rule("ulysses_sequence_parallel", "parallelism.sequence_parallel_size > 1 (DeepSpeed-Ulysses): world size, heads, "
                                   "key/value heads and seq_len divisible by it, attention not eager, "
                                   "objective causal_lm")
def _ulysses(spec, env):
    sp = spec.block("parallelism").params.sequence_parallel_size
    if sp == 1:
        return None
    problem = _shape_problem(spec, env)
    return f"parallelism.sequence_parallel_size={sp}: {problem}" if problem else None
