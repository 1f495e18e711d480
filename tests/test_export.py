"""`effitrain export` writes a Hugging Face folder from any checkpoint that computes what the training model
computed at that step: mid-run, under ZeRO-3 (partitions gathered offline), and with adapters kept apart or merged."""

from __future__ import annotations

import pytest
import torch

from conftest import effitrain_cli

pytestmark = pytest.mark.slow

PROBE = torch.arange(2 * 16).reshape(2, 16) % 200 + 3   # a fixed batch of token ids inside the tiny vocabulary


@pytest.fixture
def logits_at_each_save(monkeypatch):
    """Record the live training model's logits on PROBE whenever the loop saves a checkpoint."""
    from effitrain.engine.loop import Trainer

    seen: dict[int, torch.Tensor] = {}
    save = Trainer.save_checkpoint

    def recording_save(self):
        with torch.no_grad():
            self.state.engine.eval()
            seen[self.state.step] = self.state.engine(input_ids=PROBE.to(self.device)).logits.float().cpu()
            self.state.engine.train()
        return save(self)

    monkeypatch.setattr(Trainer, "save_checkpoint", recording_save)
    return seen


@pytest.mark.parametrize("extra", [[], ["parallelism=zero3"], ["+recipe=lora"]], ids=["zero0", "zero3", "lora"])
def test_a_mid_run_checkpoint_exports_to_the_training_models_logits(extra, tmp_path, train_in_process,
                                                                      logits_at_each_save):
    from transformers import AutoModelForCausalLM

    from effitrain.export import export_checkpoint

    run = tmp_path / "run"
    train_in_process([*extra, "train.max_steps=4", "train.save_every=2", "train.keep_checkpoints=3"], run)
    out = export_checkpoint(run / "checkpoints" / "step_00000002", tmp_path / "export", merge_adapters=True)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        logits = model(input_ids=PROBE).logits
    assert torch.allclose(logits, logits_at_each_save[2], atol=1e-5), (logits - logits_at_each_save[2]).abs().max()
    assert not torch.allclose(logits, logits_at_each_save[4], atol=1e-5)   # step 2's weights, not the final ones


def test_an_adapter_export_keeps_the_base_and_the_adapter_apart(tmp_path, train_in_process, logits_at_each_save):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    train_in_process(["+recipe=lora", "train.max_steps=2", "train.save_every=2"], run)
    result = effitrain_cli("export", str(run), "--out", str(tmp_path / "export"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "exported" in result.stdout
    out = tmp_path / "export"  # loaded as its README says: the base at the top, the adapter on it
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out), out / "adapter").eval()
    with torch.no_grad():
        logits = model(input_ids=PROBE).logits
    assert torch.allclose(logits, logits_at_each_save[2], atol=1e-5)


def test_export_refuses_a_damaged_checkpoint_and_a_non_empty_target(tmp_path, train_in_process):
    run = tmp_path / "run"
    train_in_process(["train.max_steps=2", "train.save_every=2"], run)
    target = tmp_path / "taken"
    target.mkdir()
    (target / "mine.txt").write_text("x")
    result = effitrain_cli("export", str(run), "--out", str(target))
    assert result.returncode == 2 and "is not empty and is not an earlier export" in result.stderr
    (run / "checkpoints" / "step_00000002" / "state.pt").write_bytes(b"")
    result = effitrain_cli("export", str(run / "checkpoints" / "step_00000002"), "--out", str(tmp_path / "x"))
    assert result.returncode == 2 and "state.pt" in result.stderr and "Traceback" not in result.stderr
