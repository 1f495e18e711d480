"""Generation whose distribution is exactly what the caller says, whatever the checkpoint asks for.

A pretrained checkpoint ships a ``generation_config.json`` (``repetition_penalty``, ``no_repeat_ngram_size``,
``top_k``, ``min_p``, ``suppress_tokens``, ...) that ``model.generate`` applies to any setting the call leaves out.
GRPO scores its samples as draws from ``softmax(logits / T)``; a sample drawn through a repetition penalty is not
one, and the policy gradient computed from it is biased.  So every sampling knob is set here, to "off" unless the
caller names it (as TRL's GRPOTrainer builds its own ``GenerationConfig``), and the model's own config is swapped
out for the call: ``transformers`` fills the fields a passed config leaves unset (``None``: ``min_p``,
``suppress_tokens``, ...; in 4.5x its default-valued ones) from the model's config, so passing the config alone
would not be enough.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional


def plain_generation_config(*, do_sample: bool, max_new_tokens: int, pad_token_id: Optional[int],
                            eos_token_id: Optional[int], temperature: float = 1.0, top_p: float = 1.0,
                            top_k: int = 0) -> Any:
    """Ancestral sampling at ``temperature`` (or greedy decoding) with every logits processor and warper off but
    the nucleus (``top_p`` < 1) and top-k (``top_k`` > 0) truncations a caller names (a generator block's)."""
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=do_sample, temperature=temperature if do_sample else 1.0, top_k=top_k if do_sample else 0,
        top_p=top_p if do_sample else 1.0, min_p=None,
        typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0, repetition_penalty=1.0, encoder_repetition_penalty=1.0,
        no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0, bad_words_ids=None, sequence_bias=None,
        suppress_tokens=None, begin_suppress_tokens=None, forced_bos_token_id=None, forced_eos_token_id=None,
        min_length=0, min_new_tokens=None, max_new_tokens=max_new_tokens, exponential_decay_length_penalty=None,
        renormalize_logits=False, remove_invalid_values=False, guidance_scale=None, num_beams=1, num_beam_groups=1,
        diversity_penalty=0.0, length_penalty=1.0, num_return_sequences=1, watermarking_config=None,
        pad_token_id=pad_token_id, eos_token_id=eos_token_id)


@contextlib.contextmanager
def generation_config_of(module: Any, config: Any) -> Iterator[None]:
    """``module.generation_config`` is ``config`` inside the block (the checkpoint's own comes back after)."""
    saved = getattr(module, "generation_config", None)
    module.generation_config = config
    try:
        yield
    finally:
        module.generation_config = saved


def generate_plainly(module: Any, config: Any, **inputs: Any) -> Any:
    """``module.generate(**inputs)`` under ``config`` and nothing else."""
    with generation_config_of(module, config):
        return module.generate(**inputs, generation_config=config)
