"""Static unstructured sparsity (peft=static_sparse) and the spdf recipe (sparse pre-training, dense fine-tuning).

The mechanism of SPDF's first phase: every targeted weight matrix has exactly round(s * numel) zeros at a fixed
random support, which no optimizer step and no checkpoint/resume moves; the exported model is plain and sparse; the
dense stage starts from exactly those weights and is free to move the zeros.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY, effitrain_cli


def _tiny(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))


def _sparse(model, sparsity=0.75, seed=0):
    from effitrain.models.static_sparse import apply_static_sparsity

    apply_static_sparsity(model, sparsity=sparsity, target_modules=["self_attn", "mlp"], seed=seed)
    return model


def _masks(model):
    return {name: module.weight_mask.clone() for name, module in model.named_modules() if hasattr(module, "weight_mask")}


def test_every_targeted_matrix_has_exactly_its_share_of_zeros_and_the_head_none():
    model = _sparse(_tiny())
    masks = _masks(model)
    assert len(masks) == 2 * 7   # q, k, v, o, gate, up, down in each of the 2 layers
    for name, mask in masks.items():
        assert int((mask == 0).sum()) == round(0.75 * mask.numel()), name
    assert not hasattr(model.lm_head, "weight_mask")
    assert torch.equal(_masks(_sparse(_tiny(seed=1)))["model.layers.0.mlp.up_proj"],
                       masks["model.layers.0.mlp.up_proj"])   # the support depends on the mask seed only


def test_optimizer_steps_never_move_a_masked_weight_and_the_export_is_plain():
    from effitrain.models.static_sparse import fold_masks

    model = _sparse(_tiny())
    masks = _masks(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ids = torch.randint(0, 300, (4, 16))
    for _ in range(5):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, module in model.named_modules():
        if name in masks:
            assert torch.equal(module.weight[masks[name] == 0], torch.zeros(int((masks[name] == 0).sum())))
            assert bool((module.weight[masks[name] == 1] != 0).all())   # the kept weights trained
    folded = fold_masks(model)
    assert not any("weight_orig" in n or "weight_mask" in n for n in folded.state_dict())
    assert torch.equal(folded.model.layers[1].mlp.down_proj.weight, model.model.layers[1].mlp.down_proj.weight)


@pytest.mark.slow
def test_spdf_masks_survive_resume_and_the_dense_stage_starts_from_the_sparse_weights(tmp_path, train_in_process):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    summary = train_in_process(["+recipe=spdf", "train.max_steps=4", "+stages.0.train.save_every=2"], run)
    sparse_stage, dense_stage = run / "stages" / "01-sparse", run / "stages" / "02-dense"
    sparse_rows, dense_row = summary["stages"]

    # SPDF's accounting: the sparse stage would execute 75% fewer weight FLOPs on a kernel that skips zeros
    assert sparse_rows["flops_sparse"] < sparse_rows["flops"] and dense_row["flops_sparse"] == dense_row["flops"]
    # the final sparse model: plain weights with exactly the masked share of zeros in every targeted matrix
    final = AutoModelForCausalLM.from_pretrained(sparse_stage / "final_model")
    for module in final.model.layers.modules():
        if isinstance(module, torch.nn.Linear):
            assert int((module.weight == 0).sum()) == round(0.75 * module.weight.numel())
    # the checkpoint holds the masks; the mask at step 2 equals the one at step 4 (resume rebuilds nothing else)
    early = torch.load(sparse_stage / "checkpoints" / "step_00000002" / "ds" / "mp_rank_00_model_states.pt",
                       weights_only=False)["module"]
    late = torch.load(sparse_stage / "checkpoints" / "step_00000004" / "ds" / "mp_rank_00_model_states.pt",
                      weights_only=False)["module"]
    mask_keys = [k for k in late if k.endswith("weight_mask")]
    assert len(mask_keys) == 2 * 7 and all(torch.equal(early[k], late[k]) for k in mask_keys)

    again = train_in_process(["+recipe=spdf", "train.max_steps=4", "+stages.0.train.save_every=2", "resume=auto"], run)
    assert again == json.loads((run / "summary.json").read_text())   # a finished pipeline is reported, not re-run

    # the dense stage starts from exactly the sparse weights, then trains the zeros too
    handoff = json.loads((run / "handoff" / "02-dense" / "effitrain_transform.json").read_text())
    assert handoff["info"]["linear_zero_fraction"] > 0.5
    start = AutoModelForCausalLM.from_pretrained(run / "handoff" / "02-dense")
    assert torch.equal(start.model.layers[0].mlp.up_proj.weight, final.model.layers[0].mlp.up_proj.weight)
    dense = AutoModelForCausalLM.from_pretrained(dense_stage / "final_model")
    was_zero = final.model.layers[0].mlp.up_proj.weight == 0
    assert bool((dense.model.layers[0].mlp.up_proj.weight[was_zero] != 0).any())
    assert dense_row["trainable_params"] == dense_row["total_params"]


def test_static_sparsity_under_zero3_is_refused(tmp_path):
    result = effitrain_cli("check", "+recipe=spdf", "parallelism=zero3", f"run_dir={tmp_path / 'r'}")
    assert result.returncode == 2 and "static_sparse_whole_weights" in result.stderr
