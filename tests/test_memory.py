"""memory_report reads bytes from the live tensors: parameters, gradients, optimizer state through wrappers."""

from __future__ import annotations

from types import SimpleNamespace as NS

import pytest
import torch

from effitrain.memory import memory_report, optimizer_state_bytes


def model_and_step(opt_factory):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64))
    opt = opt_factory(model)
    model(torch.randn(8, 64)).pow(2).mean().backward()
    opt.step()
    return model, opt


N_PARAMS = 64 * 128 + 128 + 128 * 64 + 64


def test_adamw_state_is_two_fp32_copies_of_the_parameters():
    model, opt = model_and_step(lambda m: torch.optim.AdamW(m.parameters()))
    r = memory_report(model, opt)
    assert r["total_params"] == r["trainable_params"] == N_PARAMS
    assert r["parameter_bytes"] == r["gradient_bytes"] == 4 * N_PARAMS
    steps = sum(s["step"].numel() * s["step"].element_size() for s in opt.state.values())
    assert r["optimizer_state_bytes"] == 2 * 4 * N_PARAMS + steps
    assert r["peak_memory_bytes"] >= r["peak_rss_bytes"] > 0 or r["peak_memory_bytes"] > 0


def test_frozen_parameters_and_missing_grads_are_counted_as_such():
    model, opt = model_and_step(lambda m: torch.optim.SGD(m.parameters(), lr=0.1))
    model[0].requires_grad_(False)
    model[0].weight.grad = None
    model[0].bias.grad = None
    r = memory_report(model, opt)
    assert r["trainable_params"] == 128 * 64 + 64
    assert r["gradient_bytes"] == 4 * (128 * 64 + 64)
    assert r["optimizer_state_bytes"] == 0


def test_wrapped_optimizers_are_walked_and_shared_tensors_counted_once():
    model, opt = model_and_step(lambda m: torch.optim.AdamW(m.parameters()))
    wrapper = NS(optimizer=opt, state={})                     # the shape of DeepSpeed's wrappers
    assert optimizer_state_bytes(wrapper)[0] == optimizer_state_bytes(opt)[0] > 0
    first = next(iter(opt.state.values()))
    first["alias"] = first["exp_avg"]                        # same storage referenced twice
    assert optimizer_state_bytes(opt)[0] == optimizer_state_bytes(wrapper)[0]


def test_eight_bit_state_is_about_a_quarter_of_adamw():
    bnb = pytest.importorskip("bitsandbytes")
    _, adam = model_and_step(lambda m: torch.optim.AdamW(m.parameters()))
    _, adam8 = model_and_step(lambda m: bnb.optim.AdamW8bit(m.parameters(), min_8bit_size=4096))
    ratio = optimizer_state_bytes(adam8)[0] / optimizer_state_bytes(adam)[0]
    assert 0.25 <= ratio < 0.3     # uint8 moments + per-block absmax; the 128/64-element biases stay fp32


def test_objects_in_state_are_walked_for_their_tensors():
    class Holder:
        def __init__(self):
            self.matrix = torch.zeros(10, 10)
    opt = NS(state={"p": {"projector": Holder(), "m": torch.zeros(5)}})
    assert optimizer_state_bytes(opt)[0] == 400 + 20


def test_galore_state_matches_the_projected_size():
    from transformers import LlamaConfig, LlamaForCausalLM
    from effitrain.optim.galore import build_galore
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=4, intermediate_size=128))
    p = NS(projector="svd", rank=8, update_proj_gap=10, scale=0.25, target_modules=["mlp"], lr=1e-3, beta1=0.9,
           beta2=0.999, eps=1e-8, weight_decay=0.0, state_bits=32)
    opt = build_galore(p, model)
    x = torch.randint(0, 64, (2, 8))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    up = model.model.layers[0].mlp.up_proj.weight  # 128 x 64 -> moments 128 x 8, projector 64 x 8
    st = opt.state[up]
    got = sum(t.numel() * t.element_size() for t in st.values())
    assert got == 4 * (2 * 128 * 8 + 64 * 8) + 4 + 8   # + step (fp32) + proj_step (int64)
