"""methods.samples: the completions it logs are the model's own greedy decoding, whatever the checkpoint's
generation config asks for."""

from __future__ import annotations

import json
from types import SimpleNamespace

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from effitrain.methods.samples import Samples


def _greedy(model, ids: torch.Tensor, steps: int, eos: int) -> list[int]:
    out = []
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            out.append(nxt)
            if nxt == eos:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def test_samples_decode_greedily_on_the_models_own_logits(tmp_path):
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *"abcdefghij"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                        pad_token="<unk>")
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    # a checkpoint's decoding rules that would change the text: never repeat a token, penalise repeats hard
    model.generation_config.no_repeat_ngram_size = 1
    model.generation_config.repetition_penalty = 50.0
    prompt = "a b a"
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    expected = _greedy(model, ids, steps=8, eos=tokenizer.eos_token_id)
    assert len(set(expected)) < len(expected), "the check needs a greedy text that repeats a token"

    Samples([prompt], max_new_tokens=8).on_eval_end(SimpleNamespace(rank=0, run_dir=tmp_path, model=model, step=3))

    line = json.loads((tmp_path / "samples.jsonl").read_text())
    assert line["step"] == 3 and line["prompt"] == prompt
    assert line["completion"] == tokenizer.decode(expected, skip_special_tokens=True)
    assert model.generation_config.no_repeat_ngram_size == 1  # the checkpoint's own config comes back
