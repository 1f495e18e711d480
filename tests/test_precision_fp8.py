"""FP8 precisions (fp8, coat), the FP8 optimizer state and the GPU kernel switches: refusals where they cannot run,
and the mechanisms that run on a CPU (module conversion, FP8 storage of saved activations, exact round trips)."""

from __future__ import annotations

import pytest
import torch

from effitrain.config.compose import compose_config
from effitrain.config.rules import Environment, check_rules
from effitrain.config.spec import validate
from effitrain.registry import ConfigError


def spec(*overrides):
    composed = compose_config(list(overrides))
    return validate(composed.cfg, composed.recipes)


H100 = Environment(device_type="cuda", bf16_supported=True, fp8_supported=True)
A100 = Environment(device_type="cuda", bf16_supported=True, fp8_supported=False)
CPU = Environment(device_type="cpu", bf16_supported=True, fp8_supported=False)


@pytest.mark.parametrize("overrides", [["precision=fp8"], ["+recipe=coat"]])
def test_fp8_precisions_are_refused_on_cpu_and_pre_hopper_gpus(overrides):
    s = spec(*overrides)
    name = s.block("precision").name
    check_rules(s, H100)
    check_rules(s, Environment())  # `effitrain check` without a device: decided at launch
    with pytest.raises(ConfigError, match=rf"\[fp8_needs_sm89\]: precision={name} needs a CUDA GPU of compute "
                                          rf"capability >= 8.9 .*this is a cpu device; use precision=bf16"):
        check_rules(s, CPU)
    with pytest.raises(ConfigError, match=r"\[fp8_needs_sm89\].*compute capability >= 8.9 \(Ada, Hopper"):
        check_rules(s, A100)


def test_fp8_is_refused_without_torchao_and_with_zero3(monkeypatch):
    from effitrain.config.blocks import precision_fp8
    with pytest.raises(ConfigError, match=r"\[fp8_not_with_zero3\].*use parallelism=zero2"):
        check_rules(spec("precision=fp8", "parallelism=zero3"), H100)
    monkeypatch.setattr(precision_fp8, "torchao_installed", lambda: False)
    with pytest.raises(ConfigError, match=r"precision=fp8 needs torchao, which is not installed"):
        check_rules(spec("precision=fp8"), H100)


def test_coat_recipe_combines_fp8_linears_activations_and_fp8_moments():
    s = spec("+recipe=coat")
    assert (s.block("precision").name, s.block("optimizer").name) == ("coat", "adamw_fp8")
    assert s.block("precision").params.group_size == 16 and s.block("optimizer").params.block_size == 128


def test_fp8_plan_is_bf16_for_deepspeed_and_converts_only_aligned_linears_but_lm_head():
    from torchao.float8.float8_linear import Float8Linear
    from transformers import LlamaConfig, LlamaForCausalLM

    plan = spec("precision=coat").block("precision").build(device_type="cuda", bf16_supported=True)
    assert plan.mode == "coat" and plan.ds_config == {"bf16": {"enabled": True}}
    assert [h.name for h in plan.hooks] == ["fp8_activation_storage"]
    # intermediate 40 is not a multiple of 16: the MLP linears must stay bf16 (torch._scaled_mm needs 16-aligned)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=40, tie_word_embeddings=False))
    model = plan.prepare_model(model)
    kinds = {name: type(m).__name__ for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {n for n, k in kinds.items() if k == "Float8Linear"} == {
        f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"}
    assert kinds["lm_head"] == "Linear" and kinds["model.layers.0.mlp.up_proj"] == "Linear"
    assert all(isinstance(model.get_submodule(f"model.layers.0.self_attn.{p}_proj"), Float8Linear) for p in "qkvo")
    assert spec("precision=bf16").block("precision").build(device_type="cuda", bf16_supported=True).hooks == ()


def test_group_quantisation_is_exact_on_representable_values_and_scales_per_group():
    from effitrain.precision.fp8 import dequantize_groups, quantize_groups

    # group 1: absmax 448 -> scale 1, every value is an E4M3 number; group 2: absmax 7 -> scale 7/448 = 1/64
    x = torch.tensor([448.0, -224.0, 1.0, 0.5, 7.0, -3.5, 0.0, 1.75])
    codes, scale = quantize_groups(x, 4)
    assert codes.dtype == torch.float8_e4m3fn and scale.flatten().tolist() == [1.0, 1 / 64]
    assert torch.equal(dequantize_groups(codes, scale, x.shape, x.dtype), x)
    # a length that is not a multiple of the group is zero-padded and cut back
    y = torch.tensor([3.0, 1.5, -0.75])
    codes, scale = quantize_groups(y, 2)
    assert codes.shape == (2, 2) and torch.equal(dequantize_groups(codes, scale, y.shape, y.dtype), y)


def test_activation_storage_packs_saved_bf16_inputs_in_fp8_but_not_weights_or_fp32():
    from effitrain.precision.fp8 import Fp8ActivationStorage, dequantize_groups, quantize_groups

    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 32, bias=False).to(torch.bfloat16)
    x = torch.randn(128, 64, dtype=torch.bfloat16, requires_grad=True)
    statistics = torch.randn(128, 64, requires_grad=True)  # fp32: what softmax/log-sum-exp statistics look like
    storage = Fp8ActivationStorage(group_size=16, min_numel=1024)
    storage.enter(layer)
    out = layer(x)
    kept = statistics.exp()  # exp saves its fp32 output: left as it is
    storage.leave()
    # only the input (128x64 bf16) is packed: 8192 one-byte codes + 512 bf16 scales; weight and fp32 left alone
    assert storage.original_bytes == 128 * 64 * 2
    assert storage.packed_bytes == 128 * 64 + (128 * 64 // 16) * 2
    grad_out = torch.randn(128, 32, dtype=torch.bfloat16)
    (out.float() * grad_out.float()).sum().backward()
    kept.sum().backward()
    # the weight gradient is grad_out^T @ (the FP8 round trip of x); the input gradient does not use x
    x_fp8 = dequantize_groups(*quantize_groups(x, 16), x.shape, x.dtype)
    torch.testing.assert_close(layer.weight.grad, grad_out.T @ x_fp8)
    torch.testing.assert_close(x.grad, grad_out @ layer.weight.detach())
    assert torch.equal(statistics.grad, statistics.detach().exp())  # exact: the fp32 tensor was not quantised
    assert not torch.equal(x_fp8, x.detach())  # FP8 rounding did happen: the first check is not vacuous
    assert not torch.allclose((grad_out.T @ x_fp8).float(), (grad_out.T @ x.detach()).float(), rtol=1e-3, atol=0)


def test_adamw_fp8_builds_torchao_optimizer_with_decay_groups():
    from torchao.optim import AdamWFp8

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    opt = spec("optimizer=adamw_fp8", "optimizer.block_size=128").block("optimizer").build(model, max_steps=10)
    assert isinstance(opt, AdamWFp8)
    assert opt.block_size == 128 and [(len(g["params"]), g["weight_decay"]) for g in opt.param_groups] == [
        (1, 0.1), (3, 0.0)]


def _compiled_step(optimizer):
    """``optimizer.step()``; skips where torchao's step cannot be compiled (it runs the update through
    ``torch.compile``, whose CPU backend needs a C++ compiler) -- the one place this check cannot run."""
    from torch._inductor.exc import InvalidCxxCompiler

    try:
        optimizer.step()
    except Exception as error:   # dynamo wraps the backend's failure
        if isinstance(error, InvalidCxxCompiler) or isinstance(getattr(error, "inner_exception", None),
                                                                InvalidCxxCompiler):
            pytest.skip(f"torchao's AdamWFp8 compiles its step with torch.compile, which needs a C++ compiler "
                        f"here: {error}")
        raise


def test_coat_stores_both_adam_moments_in_fp8_after_a_step():
    """COAT's optimizer half, as the recipe builds it: after one step the moments of a large matrix are E4M3 codes
    (1 byte a value) with one fp32 scale per block of 128, and they dequantise to AdamW's first-step moments
    (1 - beta) g and (1 - beta2) g^2 within E4M3's rounding (3 mantissa bits: a relative 2^-4, or 2^-9 of the
    block's scale for the smallest values); small tensors keep fp32 moments, as torchao (and bitsandbytes) do."""
    from torchao.optim.subclass_fp8 import OptimStateFp8

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.LayerNorm(64))
    block = spec("+recipe=coat").block("optimizer")
    optimizer = block.build(model, max_steps=10)
    grads = {p: torch.randn_like(p) for p in model.parameters()}
    for p, g in grads.items():
        p.grad = g.clone()
    _compiled_step(optimizer)
    weight = model[0].weight
    state = optimizer.state[weight]
    beta1, beta2 = block.params.beta1, block.params.beta2
    for key, exact in (("exp_avg", (1 - beta1) * grads[weight]), ("exp_avg_sq", (1 - beta2) * grads[weight] ** 2)):
        moment = state[key]
        assert isinstance(moment, OptimStateFp8) and moment.codes.dtype == torch.float8_e4m3fn
        assert moment.codes.element_size() == 1 and moment.codes.numel() == weight.numel() == 8192
        assert moment.scale.dtype == torch.float32 and moment.block_size == 128 and moment.scale.numel() == 8192 // 128
        stored = moment.dequantize()
        scale = moment.scale.repeat_interleave(128).view_as(exact)
        assert bool(((stored - exact).abs() <= exact.abs() * 2 ** -4 + scale * 2 ** -9).all())
        assert not torch.equal(stored, exact)   # rounded: the moments are not kept in full precision somewhere
    for small in (model[0].bias, model[1].weight):
        assert all(type(v) is torch.Tensor and v.dtype == torch.float32 for v in optimizer.state[small].values())


def test_kernel_switches_are_refused_where_they_cannot_run(monkeypatch):
    from effitrain.config.blocks import model_kernels
    monkeypatch.setattr(model_kernels, "installed", lambda module: True)
    fa = spec("model.attn_implementation=flash_attention_2", "precision=bf16")
    check_rules(fa, H100)
    with pytest.raises(ConfigError, match=r"\[flash_attention_needs_cuda\].*this is a cpu device; use "
                                          r"model.attn_implementation=sdpa"):
        check_rules(fa, CPU)
    with pytest.raises(ConfigError, match=r"computes in bf16/fp16 only; use precision=bf16"):
        check_rules(spec("model.attn_implementation=flash_attention_2", "precision=fp32"), H100)
    liger = spec("model.liger_kernels=true")
    check_rules(liger, H100)
    with pytest.raises(ConfigError, match=r"\[liger_needs_cuda\].*Triton\), this is a cpu device; set "
                                          r"model.liger_kernels=false"):
        check_rules(liger, CPU)
    with pytest.raises(ConfigError, match=r"returns no logits from a training forward, and objective "
                                          r"'weighted_causal_lm' reads them; use objective=causal_lm"):
        check_rules(spec("model.liger_kernels=true", "objective=weighted_causal_lm"), H100)
    with pytest.raises(ConfigError, match=r"no kernels for gpt_neox"):
        check_rules(spec("model=pythia_160m", "model.liger_kernels=true"), H100)
    monkeypatch.setattr(model_kernels, "installed", lambda module: False)
    with pytest.raises(ConfigError, match=r"needs the flash-attn package, which is not installed"):
        check_rules(fa, H100)
    with pytest.raises(ConfigError, match=r"needs the liger-kernel package, which is not installed"):
        check_rules(liger, H100)


@pytest.mark.parametrize("overrides, message", [
    (["model.hidden_size=96", "model.num_heads=6", "model.num_kv_heads=3", "parallelism.sequence_parallel_size=4"],
     r"model.num_heads=6 is not divisible by sequence_parallel_size=4"),
    (["model.num_heads=4", "model.num_kv_heads=2", "dataset.seq_len=66", "parallelism.sequence_parallel_size=4"],
     r"dataset.seq_len=66 is not divisible"),
    (["model.attn_implementation=eager", "parallelism.sequence_parallel_size=2"], r"model.attn_implementation=eager builds a full 4-D mask"),
    (["objective=weighted_causal_lm", "parallelism.sequence_parallel_size=2"],
     r"objective=weighted_causal_lm scores whole sequences, not slices of them; sequence parallelism trains with "
     r"objective=causal_lm"),
])
def test_sequence_parallel_shapes_and_objective_are_validated(overrides, message):
    with pytest.raises(ConfigError, match=r"\[ulysses_sequence_parallel\]: parallelism.sequence_parallel_size=\d: "
                                          + message):
        check_rules(spec(*overrides), Environment(device_type="cuda", world_size=4))  # (spec() checks rules too)
    check_rules(spec(*overrides[:-1]), Environment(device_type="cuda", world_size=4))  # sp=1: nothing checked


def test_sequence_parallel_size_must_divide_the_world_size_known_at_launch():
    s = spec("model.hidden_size=96", "model.num_heads=6", "model.num_kv_heads=3", "dataset.seq_len=96")
    s.block("parallelism").params.sequence_parallel_size = 3  # valid shapes; the world size is only known at launch
    with pytest.raises(ConfigError, match=r"the world size 4 is not divisible by sequence_parallel_size=3"):
        check_rules(s, Environment(device_type="cuda", world_size=4))
    check_rules(s, Environment(device_type="cuda", world_size=6))  # 2 groups of 3 processes: accepted


@pytest.mark.slow  # a real launch: torch and DeepSpeed start before the device is known
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_coat_launch_on_cpu_exits_2_with_one_line_and_no_run_dir(tmp_path):
    from conftest import effitrain_cli

    run_dir = tmp_path / "run"
    result = effitrain_cli("+recipe=coat", f"run_dir={run_dir}")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == ["effitrain: error: incompatible configuration [fp8_needs_sm89]: precision=coat needs a CUDA GPU "
                     "of compute capability >= 8.9 (FP8 matmuls), this is a cpu device; use precision=bf16 (or "
                     "precision=auto)"], result.stderr
    assert "Traceback" not in result.stdout and not run_dir.exists()


def _e4m3_tensorwise(t):
    """torchao's tensorwise cast, by hand: scale = 448 / amax, saturate, round to E4M3."""
    scale = 448.0 / t.float().abs().amax().clamp(min=1e-12)
    return (t.float() * scale).clamp(-448, 448).to(torch.float8_e4m3fn), scale


def test_float8_linear_computes_the_tensorwise_fp8_matmul_exactly():
    # torch._scaled_mm has a CPU path, so the FP8 arithmetic itself can be checked here (training on a CPU is still
    # refused: it would be slower than bf16)
    torch.manual_seed(0)
    layer = torch.nn.Linear(32, 16, bias=False).to(torch.bfloat16)
    weight = layer.weight.detach().clone()
    plan = spec("precision=fp8").block("precision").build(device_type="cuda", bf16_supported=True)
    model = plan.prepare_model(torch.nn.Sequential(layer))
    x = torch.randn(8, 32, dtype=torch.bfloat16)
    (x8, sx), (w8, sw) = _e4m3_tensorwise(x), _e4m3_tensorwise(weight)
    expected = ((x8.float() @ w8.float().T) / (sx * sw)).to(torch.bfloat16)
    out = model(x)
    assert torch.equal(out, expected)
    assert not torch.equal(out, x @ weight.T)  # it is not the bf16 matmul


def test_a_coat_training_step_on_a_tiny_llama_tracks_bf16():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=False)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))

    def step(precision):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        extra = ["precision.min_numel=1024"] if precision == "coat" else []
        plan = spec(f"precision={precision}", *extra).block("precision").build(device_type="cuda",
                                                                                bf16_supported=True)
        if plan.prepare_model is not None:
            model = plan.prepare_model(model)
        model = model.to(torch.bfloat16).train()
        for hook in plan.hooks:
            hook.enter(model)
        loss = model(input_ids=ids, labels=ids).loss
        for hook in plan.hooks:
            hook.leave()
        loss.backward()
        grads = torch.cat([p.grad.float().flatten() for p in model.parameters()])
        return loss.detach().float(), grads, plan.hooks

    loss_bf16, grads_bf16, _ = step("bf16")
    loss_coat, grads_coat, (storage,) = step("coat")
    # every packed tensor is bf16 with a multiple of 16 values: 2 bytes each become 1 byte + a 2-byte scale per 16
    assert storage.original_bytes > 0 and storage.packed_bytes * 16 == storage.original_bytes * 9
    assert abs(loss_coat - loss_bf16) / loss_bf16 < 0.01
    cosine = torch.nn.functional.cosine_similarity(grads_coat, grads_bf16, dim=0)
    assert 0.99 < cosine < 1.0  # FP8 changes the gradient a little, and only a little (measured: 0.998)
