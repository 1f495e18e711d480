"""Rules of DeepSpeed-Ulysses sequence parallelism (``parallelism.sequence_parallel_size``), torch-free.

Ulysses (arXiv 2309.14509; DeepSpeed ``runtime/sequence_parallel/ulysses_sp.py``) splits every sequence over
``sp`` processes; inside attention an all-to-all swaps the split from the sequence to the heads, so each process
attends over the whole sequence for ``heads / sp`` heads.  That fixes what the configuration must satisfy, checked
here in the order a user would fix them.  Beyond these shape rules, ``sp > 1`` is refused for now: the training
loop does not yet shard batches over the sequence or combine the per-shard losses (see ``ULYSSES_MISSING``).
"""

from __future__ import annotations

from effitrain.config.rules import rule

#: what the loop lacks for sp > 1, named in the refusal (and in docs/guide.md)
ULYSSES_MISSING = ("the loop does not yet shard each micro-batch over the sequence with position_ids, weight the "
                   "per-shard losses by their token counts, or pass DeepSpeed the sequence-parallel groups (mpu)")


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
    return None


@rule("ulysses_sequence_parallel", "parallelism.sequence_parallel_size > 1 (DeepSpeed-Ulysses): world size, heads, "
                                   "key/value heads and seq_len divisible by it, attention not eager; not wired yet")
def _ulysses(spec, env):
    sp = spec.block("parallelism").params.sequence_parallel_size
    if sp == 1:
        return None
    problem = _shape_problem(spec, env)
    if problem:
        return f"parallelism.sequence_parallel_size={sp}: {problem}"
    return (f"parallelism.sequence_parallel_size={sp}: DeepSpeed-Ulysses is not available in effitrain yet: "
            f"{ULYSSES_MISSING}; use parallelism.sequence_parallel_size=1")
