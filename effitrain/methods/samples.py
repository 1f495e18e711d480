"""Greedy completions of a few prompts at every evaluation, appended to ``RUN_DIR/samples.jsonl``.

One JSON line per prompt and evaluation: ``{"step", "prompt", "completion"}``.  Generation runs on rank 0 with the
live model in eval mode and the run's own tokenizer (saved in ``RUN_DIR/tokenizer``), so the lines show what the
model writes at the step its eval loss was measured.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from effitrain.engine.events import Hook
from effitrain.objectives.generation import generate_plainly, plain_generation_config


class Samples(Hook):
    name = "samples"

    def __init__(self, prompts: list[str], max_new_tokens: int) -> None:
        self.prompts = list(prompts)
        self.max_new_tokens = max_new_tokens
        self._tokenizer: Any = None

    def on_eval_end(self, state: Any) -> None:
        if state.rank != 0:
            return
        if self._tokenizer is None:
            from transformers import AutoTokenizer
            self._tokenizer = AutoTokenizer.from_pretrained(str(state.run_dir / "tokenizer"))
        model, tok = state.model, self._tokenizer
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        lines = []
        # greedy on the model's own logits: a checkpoint's generation config (a repetition penalty, banned n-grams)
        # would show another decoder's text than the model's
        config = plain_generation_config(do_sample=False, max_new_tokens=self.max_new_tokens,
                                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        with torch.no_grad():
            for prompt in self.prompts:
                ids = tok(prompt, return_tensors="pt")["input_ids"].to(device)
                out = generate_plainly(model, config, input_ids=ids, attention_mask=torch.ones_like(ids))
                completion = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
                lines.append({"step": state.step, "prompt": prompt, "completion": completion})
        if was_training:
            model.train()
        with open(state.run_dir / "samples.jsonl", "a") as fh:
            fh.writelines(json.dumps(line) + "\n" for line in lines)


def build_samples(params: Any) -> Samples:
    return Samples(params.prompts, params.max_new_tokens)
