"""PEFT blocks: trainable parameters are what peft reports; merged export reproduces the adapter model's logits and
loads without peft; MAM and SLTrain transforms; prompt-learning exports say they are not merged."""

from __future__ import annotations

import json
from types import SimpleNamespace as NS

import pytest
import torch

from effitrain.peft.adapters import (build_dora, build_ia3, build_lora, build_pissa, build_prefix, export_final_model,
                                     trainable_report)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=64))


LORA = dict(r=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"], modules_to_save=[])
X = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))


def perturb(model):
    """Move the adapter away from its (often identity) initialisation, as training would."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def test_lora_trainable_parameters_equal_what_peft_reports_and_match_the_formula():
    model = build_lora(NS(**LORA), tiny_llama())
    trainable, total = trainable_report(model)
    assert (trainable, total) == tuple(model.get_nb_trainable_parameters())
    own = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # per layer: q (32->32), v (32->16 with 2 kv heads of 8), up (32->64): r * (in + out) each
    assert own == trainable == 2 * 4 * ((32 + 32) + (32 + 16) + (32 + 64))
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("build,extra", [(build_lora, {}), (build_dora, {}), (build_pissa, {"niter": 2}),
                                         (build_ia3, None)])
def test_merged_export_has_the_adapter_models_logits_and_loads_without_peft(tmp_path, build, extra):
    from transformers import AutoModelForCausalLM
    params = NS(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]) \
        if extra is None else NS(**LORA, **extra)
    model = build(params, tiny_llama())
    perturb(model)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=X).logits
    info = export_final_model(model, None, tmp_path / "final")
    assert info["merged"] is True and (tmp_path / "final" / "adapter" / "adapter_config.json").is_file()
    assert json.loads((tmp_path / "final" / "effitrain_export.json").read_text())["merged"] is True
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    assert not any("lora" in n or "ia3" in n for n, _ in loaded.named_parameters())
    with torch.no_grad():
        got = loaded(input_ids=X).logits
    assert torch.allclose(got, expected, atol=1e-4)
    # the live model still has its adapter (the merge happened on a copy)
    assert any(p.requires_grad for n, p in model.named_parameters() if "lora" in n or "ia3" in n)


def test_prefix_export_keeps_the_adapter_and_says_it_is_not_merged(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    model = build_prefix(NS(num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=16), tiny_llama())
    perturb(model)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=X, attention_mask=torch.ones_like(X)).logits
    info = export_final_model(model, None, tmp_path / "final")
    assert info["merged"] is False and "cannot be folded" in info["note"]
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    reloaded = PeftModel.from_pretrained(base, tmp_path / "final" / "adapter").eval()
    with torch.no_grad():
        got = reloaded(input_ids=X, attention_mask=torch.ones_like(X)).logits
    assert torch.allclose(got, expected, atol=1e-5)


def test_mam_adapter_trains_prefix_and_parallel_adapters_and_exports_both(tmp_path):
    from transformers import AutoModelForCausalLM
    from effitrain.peft.mam import ParallelAdapter, build_mam_adapter, load_parallel_adapters
    base = tiny_llama()
    with torch.no_grad():
        base_logits = base(input_ids=X).logits
    model = build_mam_adapter(NS(prefix_length=4, prefix_hidden=16, adapter_bottleneck=8, adapter_scale=4.0,
                                 ffn_modules=["mlp"]), base)
    adapters = [m for m in model.modules() if isinstance(m, ParallelAdapter)]
    assert len(adapters) == 2 and all(p.requires_grad for a in adapters for p in a.parameters())
    trainable = {n.split(".")[-3] if "parallel_adapter" in n else "prefix" for n, p in model.named_parameters()
                 if p.requires_grad}
    assert "parallel_adapter" in " ".join(n for n, p in model.named_parameters() if p.requires_grad)
    assert any("prompt_encoder" in n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable_report(model)[0] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    # the adapter's zero-initialised up-projection leaves the FFN output unchanged at the start
    mlp = base.model.layers[0].mlp
    h = torch.randn(2, 3, 32)
    assert torch.allclose(mlp(h), mlp.down_proj(mlp.act_fn(mlp.gate_proj(h)) * mlp.up_proj(h)))
    perturb(model)
    model(input_ids=X, labels=X).loss.backward()
    assert adapters[0].up.weight.grad is not None
    info = export_final_model(model, None, tmp_path / "final")
    assert info["merged"] is False
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "final")  # stock class, no adapter keys
    assert not any("parallel_adapter" in n for n, _ in exported.named_parameters())
    load_parallel_adapters(exported, str(tmp_path / "final" / "adapter" / "parallel_adapters.safetensors"))
    assert torch.equal(exported.model.layers[0].mlp.parallel_adapter.up.weight, adapters[0].up.weight.detach())


def test_sltrain_reparameterises_targets_and_exports_dense_equivalent(tmp_path):
    from transformers import AutoModelForCausalLM
    from effitrain.models.sltrain import SLTrainLinear, build_sltrain
    model = build_sltrain(NS(rank=4, sparsity=0.05, alpha=8.0, target_modules=["self_attn", "mlp"], seed=0),
                          tiny_llama())
    sl = model.model.layers[0].mlp.up_proj
    assert isinstance(sl, SLTrainLinear)
    assert sl.A.shape == (4, 32) and sl.B.shape == (64, 4)
    assert sl.sparse_values.numel() == round(0.05 * 32 * 64) and sl.sparse_index.unique().numel() == sl.sparse_index.numel()
    dense = sum(p.numel() for n, p in tiny_llama().named_parameters() if "layers." in n and p.ndim == 2)
    factored = sum(p.numel() for n, p in model.named_parameters() if "layers." in n and n.endswith(("A", "B", "sparse_values")))
    assert factored < dense
    # W = (alpha/r) B A + S
    w = sl.dense_weight()
    expected = (sl.B @ sl.A) * 2.0
    expected.view(-1)[sl.sparse_index] += sl.sparse_values
    assert torch.allclose(w, expected)
    model(input_ids=X, labels=X).loss.backward()
    assert sl.A.grad is not None and sl.sparse_values.grad is not None
    with torch.no_grad():
        expected_logits = model(input_ids=X).logits
    export_final_model(model, None, tmp_path / "final")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=X).logits, expected_logits, atol=1e-5)
    assert isinstance(model.model.layers[0].mlp.up_proj, SLTrainLinear)  # the live model is untouched


def test_unmatched_targets_are_a_config_error():
    from effitrain.registry import ConfigError
    with pytest.raises(ConfigError, match="peft"):
        build_lora(NS(**{**LORA, "target_modules": ["wq"]}), tiny_llama())


def test_sltrain_starts_as_the_authors_layer_b_zero_and_the_60m_scale():
    from effitrain.config.compose import compose_config
    from effitrain.config.spec import validate
    from effitrain.models.sltrain import SLTrainLinear
    composed = compose_config(["+recipe=sltrain"])
    spec = validate(composed.cfg, composed.recipes)
    peft, opt = spec.block("peft").params, spec.block("optimizer").params
    assert peft.alpha / peft.rank == 32 / 128                    # the 60M script: lora_alpha 32 at rank 128
    assert (opt.weight_decay, opt.beta1, opt.beta2, opt.lr) == (0.0, 0.9, 0.999, 3e-3)
    layer = SLTrainLinear(64, 32, rank=8, sparsity=0.03, alpha=2.0, bias=False,
                          generator=torch.Generator().manual_seed(0))
    assert torch.count_nonzero(layer.B) == 0 and torch.count_nonzero(layer.A) == layer.A.numel()
    dense = layer.dense_weight()
    assert torch.count_nonzero(dense) == layer.sparse_values.numel()   # W = S at initialisation
    assert layer.sparse_values.abs().max() <= 1 / 64 ** 0.5
