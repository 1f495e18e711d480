"""LISA: exactly gamma decoder layers plus embeddings/norm/head get gradients; the set changes every K steps;
optimizer state of leaving layers is dropped; the sampling state round-trips through state_dict."""

from __future__ import annotations

from types import SimpleNamespace as NS

import pytest
import torch

from effitrain.methods.lisa import LISA, find_layers


def tiny_llama(layers=6):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                        tie_word_embeddings=False))


def layers_with_grad(model):
    return sorted(i for i, layer in enumerate(model.model.layers)
                  if any(p.grad is not None for p in layer.parameters()))


def run(hook, model, opt, steps, start=0, record=None):
    state = NS(model=model, optimizer=opt, spec=NS(train=NS(seed=0)), step=start, metrics={})
    if start == 0:
        hook.on_fit_start(state)
    g = torch.Generator().manual_seed(start)
    for step in range(start + 1, start + steps + 1):
        x = torch.randint(0, 64, (2, 8), generator=g)
        model(input_ids=x, labels=x).loss.backward()
        if record is not None:
            record.append((step, layers_with_grad(model), list(hook.active),
                           [n for n, p in model.named_parameters() if p.grad is not None and "layers." not in n]))
        opt.step()
        opt.zero_grad(set_to_none=True)
        state.step = step
        hook.on_step_end(state)
    return state


def test_only_gamma_layers_plus_embeddings_and_head_get_gradients_and_the_set_changes_every_k():
    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    hook = LISA(active_layers=2, interval=3, seed=1)
    record = []
    run(hook, model, opt, 12, record=record)
    outside = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for step, with_grad, active, others in record:
        assert len(with_grad) == 2 and with_grad == active, step
        assert set(others) == outside, step
    sets = [tuple(a) for _, _, a, _ in record]
    # constant within each window of K=3 steps, and re-drawn at each window boundary
    windows = [sets[i:i + 3] for i in range(0, 12, 3)]
    assert all(len(set(w)) == 1 for w in windows)
    assert len({w[0] for w in windows}) > 1
    assert hook.switches == 4


def test_optimizer_state_of_leaving_layers_is_dropped():
    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    hook = LISA(active_layers=1, interval=1, seed=0)
    record = []
    run(hook, model, opt, 6, record=record)
    with_state = {i for i, layer in enumerate(model.model.layers) if any(p in opt.state for p in layer.parameters())}
    # 6 layers were drawn one at a time; only a layer that is still active may hold state
    assert with_state <= set(hook.active)
    assert len({tuple(a) for _, _, a, _ in record}) > 1
    # embeddings and head always keep their state
    assert model.model.embed_tokens.weight in opt.state and model.lm_head.weight in opt.state


def test_active_layers_hold_state_while_they_train():
    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    hook = LISA(active_layers=2, interval=100, seed=0)
    run(hook, model, opt, 2)
    trained = {i for i, layer in enumerate(model.model.layers) if any(p in opt.state for p in layer.parameters())}
    assert trained == set(hook.active)


def test_sampling_state_roundtrips_so_a_resumed_run_draws_the_same_sets():
    model_a = tiny_llama()
    opt_a = torch.optim.AdamW(model_a.parameters(), lr=1e-3)
    full = LISA(active_layers=2, interval=2, seed=3)
    rec_full = []
    run(full, model_a, opt_a, 10, record=rec_full)

    model_b = tiny_llama()
    opt_b = torch.optim.AdamW(model_b.parameters(), lr=1e-3)
    first = LISA(active_layers=2, interval=2, seed=3)
    run(first, model_b, opt_b, 4)
    saved = first.state_dict()
    resumed = LISA(active_layers=2, interval=2, seed=999)   # the seed is ignored once state is loaded
    resumed.load_state_dict(saved)
    state = NS(model=model_b, optimizer=opt_b, spec=NS(train=NS(seed=0)), step=4, metrics={})
    resumed.on_fit_start(state)
    rec_resumed = []
    run(resumed, model_b, opt_b, 6, start=4, record=rec_resumed)
    assert [a for _, _, a, _ in rec_resumed] == [a for _, _, a, _ in rec_full[4:]]


def test_errors_name_the_fix():
    with pytest.raises(ValueError, match="layers_path"):
        find_layers(torch.nn.Linear(2, 2))
    hook = LISA(active_layers=9, interval=2)
    with pytest.raises(ValueError, match="only 6 decoder layers"):
        hook.on_fit_start(NS(model=tiny_llama(), optimizer=None, spec=NS(train=NS(seed=0))))
