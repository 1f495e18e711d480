"""model.gradient_checkpointing: each decoder layer is recomputed in backward (non-reentrant checkpointing), with
the same loss and gradients as storing the activations."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from effitrain.config.compose import compose_config
from effitrain.config.spec import validate


class _Vocabulary:
    """What the model builders read from a tokenizer: its size and special ids."""
    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __len__(self) -> int:
        return 97


def _model(checkpointing: bool):
    cfg = compose_config(["model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2",
                          f"model.gradient_checkpointing={str(checkpointing).lower()}"]).cfg
    torch.manual_seed(0)
    return validate(cfg).block("model").build(tokenizer=_Vocabulary())


def _loss_grads_and_attention_calls(model):
    calls = []
    model.model.layers[0].self_attn.register_forward_hook(lambda *_: calls.append(1))
    model.train()
    ids = torch.randint(3, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls)


def test_checkpointing_recomputes_layers_with_equal_loss_and_gradients():
    plain, checkpointed = _model(False), _model(True)
    assert not plain.is_activation_checkpointing and checkpointed.is_activation_checkpointing
    func = checkpointed.model.layers[0]._gradient_checkpointing_func
    assert isinstance(func, functools.partial) and func.keywords == {"use_reentrant": False}

    loss_off, grads_off, calls_off = _loss_grads_and_attention_calls(plain)
    loss_on, grads_on, calls_on = _loss_grads_and_attention_calls(checkpointed)
    # the layer ran again in backward (torch stops the replay once it has what backward needs, so attention runs
    # again but not necessarily the MLP): its activations were not kept
    assert (calls_off, calls_on) == (1, 2)
    torch.testing.assert_close(loss_on, loss_off, rtol=0, atol=1e-6)
    assert grads_on.keys() == grads_off.keys()
    for name in grads_off:
        torch.testing.assert_close(grads_on[name], grads_off[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_a_lora_run_with_checkpointing_follows_the_same_losses(tmp_path, train_in_process):
    # LoRA freezes the embeddings, so the layer inputs do not require grad: the case non-reentrant checkpointing is for
    def losses(flag: str):
        run_dir = tmp_path / flag
        summary = train_in_process(["peft=lora", f"model.gradient_checkpointing={flag}", "train.max_steps=3"], run_dir)
        assert summary["finished"]
        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [line["loss"] for line in lines if "loss" in line]

    off, on = losses("false"), losses("true")
    assert len(off) == 3 and on == pytest.approx(off, rel=1e-5, abs=1e-6)
