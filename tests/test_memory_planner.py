"""The memory planner (`effitrain check --memory`): per-device bytes from the config alone, hand-checkable."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from conftest import REPO, TINY, effitrain_cli
from effitrain.config.compose import compose_config
from effitrain.config.spec import validate
from effitrain.planner.memory import plan, setup_from_spec
from effitrain.planner.shapes import ModelShape

# TINY's model: vocab 512, hidden 64, intermediate 128, 2 layers, 4 heads, 2 kv heads (head 16, kv width 32), tied
V, H, I, L, KV = 512, 64, 128, 2, 32
PER_LAYER = H * H + KV * H + KV * H + H * H + 3 * I * H + 2 * H    # q, k, v, o, gate/up/down, two RMSNorms
PARAMS = V * H + L * PER_LAYER + H                                  # embedding (tied head), layers, final norm
TENSORS = 1 + L * 9 + 1                                             # each AdamW tensor has a 4-byte step counter


def planned(*overrides: str, world: int = 1):
    composed = compose_config([*TINY, *overrides])
    return plan(setup_from_spec(validate(composed.cfg, composed.recipes), world=world))


def test_parameter_count_of_a_llama_shape_by_hand():
    assert PER_LAYER == 36_992 and PARAMS == 32_768 + 2 * 36_992 + 64 == 106_816
    assert planned("precision=fp32").total_params == PARAMS
    # Llama-2-7B's published count, from the preset's dimensions alone
    seven_b = ModelShape("llama", vocab=32000, hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32,
                         tied=False)
    assert seven_b.count() == 6_738_415_616


def test_adamw_fp32_one_process_is_params_x4_grads_x4_states_x8():
    p = planned("precision=fp32", "parallelism=ddp")
    assert p.get("parameter_bytes").device == 4 * PARAMS
    assert p.get("gradient_bytes").device == 4 * PARAMS
    assert p.get("optimizer_state_bytes").device == 8 * PARAMS + 4 * TENSORS
    assert p.get("master_weight_bytes").device == 0          # fp32 without ZeRO: the parameters are the masters
    assert p.get("reduction_bucket_bytes").device == 0


def test_zero2_on_two_processes_divides_gradients_and_states_not_parameters():
    one = planned("precision=fp32", "parallelism=zero2", "parallelism.reduce_bucket_size=1000", world=1)
    two = planned("precision=fp32", "parallelism=zero2", "parallelism.reduce_bucket_size=1000", world=2)
    assert two.get("parameter_bytes").device == one.get("parameter_bytes").device == 4 * PARAMS
    assert two.get("gradient_bytes").device == 4 * PARAMS // 2 == one.get("gradient_bytes").device // 2
    # one flat fp32 partition per rank: moments 8 B per element and one step counter
    assert two.get("optimizer_state_bytes").device == 8 * PARAMS // 2 + 4
    assert two.get("master_weight_bytes").device == 4 * PARAMS // 2   # DeepSpeed clones its fp32 partition
    assert two.get("reduction_bucket_bytes").device == 1000 * 4


def test_lora_counts_only_the_adapters_in_gradients_and_optimizer_state():
    p = planned("precision=fp32", "+recipe=lora", "peft.r=4", "peft.target_modules=[q_proj,v_proj]")
    adapters = L * (4 * (H + H) + 4 * (H + KV))   # A: r x in, B: out x r, on q (64 -> 64) and v (64 -> 32)
    assert p.trainable_params == adapters == 1792
    assert p.get("gradient_bytes").device == 4 * adapters
    assert p.get("optimizer_state_bytes").device == 8 * adapters + 4 * (4 * L)
    assert p.get("parameter_bytes").device == 4 * (PARAMS + adapters)  # the frozen base stays on the device


def test_lisa_trains_the_outer_weights_and_active_layers_only():
    p = planned("precision=fp32", "+recipe=lisa", "model=tiny_llama", "methods.lisa.active_layers=1")
    assert p.trainable_params == PARAMS - PER_LAYER


def test_activation_checkpointing_keeps_one_layer_and_the_layer_inputs():
    plain = planned("precision=fp32", "train.micro_batch_size=2").get("activation_bytes").device
    ckpt = planned("precision=fp32", "train.micro_batch_size=2", "model.gradient_checkpointing=true")
    tokens, heads = 2 * 64, 4
    # per token and layer: 5 hidden-sized, 3 q-sized (q = h here), 2 kv-sized, 4 MLP-sized tensors, the SDPA
    # log-sum-exp per head and two reciprocal RMS values
    per_layer = 5 * H + 3 * H + 2 * KV + 4 * I + heads + 2
    head = 3 * H * 4 + V * 4                     # final norm in/out and head input; the fp32 log-softmax
    assert plain == tokens * (L * per_layer * 4 + head)
    assert ckpt.get("activation_bytes").device == tokens * ((L * H + per_layer) * 4 + head)


def test_sequence_parallelism_keeps_one_slice_of_each_sequence_per_process():
    whole = planned("precision=fp32", "train.micro_batch_size=2", world=2)
    split = planned("precision=fp32", "train.micro_batch_size=2", "parallelism.sequence_parallel_size=2", world=2)
    assert split.get("activation_bytes").device * 2 == whole.get("activation_bytes").device
    assert split.get("parameter_bytes").device == whole.get("parameter_bytes").device  # weights are not split


def test_verb_prints_the_table_and_a_verdict_without_torch():
    code = ("import sys, time; from effitrain.cli import main; t = time.perf_counter(); "
            f"rc = main(['check', '--memory', '--device-gib', '0.001', *{TINY!r}]); "
            "heavy = [m for m in ('torch', 'deepspeed', 'transformers', 'datasets') if m in sys.modules]; "
            "print('RESULT', heavy, rc, time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    heavy, rc, seconds = out.stdout.split("RESULT ", 1)[1].rsplit(" ", 2)
    assert heavy == "[]" and rc == "1", out.stdout + out.stderr
    assert float(seconds) < 5
    assert "verdict: does not fit:" in out.stdout and "> 0.001 GiB" in out.stdout
    assert "optimizer state" in out.stdout and "activations (one micro-batch)" in out.stdout


def test_verdict_fits_exits_zero_and_bad_flags_are_one_line():
    ok = effitrain_cli("check", "--memory", "--device-gib=80", "precision=fp32", *TINY)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip().splitlines()[-1].startswith("verdict: fits: 0.00 GiB of 80 GiB per device")
    bad = effitrain_cli("check", "--memory", "--device-gib", "lots", *TINY)
    assert bad.returncode == 2 and bad.stderr.strip() == \
        "effitrain: error: check --device-gib: expected a number of GiB, got 'lots'"
    unknown = effitrain_cli("check", "--memory", "optimizer=lion", *TINY)
    assert unknown.returncode == 2 and "optimizer" in unknown.stderr and "Traceback" not in unknown.stderr
