"""QLoRA (Dettmers et al. 2023, 2305.14314): the frozen base quantised to 4-bit NormalFloat through bitsandbytes,
LoRA adapters on every linear layer on top, through peft.  Torch-free: the block's parameters and the rule that
refuses it where bitsandbytes' 4-bit kernels cannot run."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from effitrain.config.blocks.peft_adapters import _LoraCommon
from effitrain.config.rules import rule
from effitrain.registry import ConfigError, param, register

ALL_LINEAR = "all-linear"


@register("peft", "qlora", builder="effitrain.peft.qlora:build_qlora",
          summary="QLoRA: 4-bit NF4 frozen base (bitsandbytes, double quantisation) with LoRA on every linear layer "
                  "(Dettmers et al., 2305.14314); CUDA only")
@dataclass
class QLoraParams(_LoraCommon):
    # the authors' scripts/finetune_guanaco_*.sh: --lora_r 64 --lora_alpha 16 --lora_modules all --lora_dropout 0.1
    r: int = param(64, ge=1, help="adapter rank (QLoRA: 64 at every model size)")
    alpha: float = param(16.0, gt=0, help="the update is scaled by alpha / r (QLoRA: 16)")
    dropout: float = param(0.1, ge=0, lt=1, help="QLoRA: 0.1 up to 13B, 0.05 for 33B and 65B")
    target_modules: list[str] = param(default_factory=lambda: [ALL_LINEAR],
                                      help="['all-linear'] = every linear layer but the LM head (the authors' "
                                           "find_all_linear_names), or module-name suffixes")
    quant_type: Literal["nf4", "fp4"] = param("nf4", help="4-bit data type of the frozen base (QLoRA: nf4)")
    double_quant: bool = param(True, help="quantise the quantisation constants too (QLoRA: on; ~0.37 bit/param)")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = param(
        "bfloat16", help="dtype the 4-bit weights are dequantised to for each matmul (QLoRA: bf16)")
    gradient_checkpointing: bool = param(True, help="recompute activations in backward (QLoRA: on; "
                                                    "peft's prepare_model_for_kbit_training)")

    def validate(self, path: str) -> None:
        super().validate(path)
        if ALL_LINEAR in self.target_modules and len(self.target_modules) > 1:
            raise ConfigError(f"{path}.target_modules: '{ALL_LINEAR}' already names every linear layer; give it "
                              f"alone or list module names")


def cuda_device_visible() -> bool:
    """Whether this machine shows an NVIDIA GPU to this process, answered without importing torch (so that
    `effitrain check` stays a tool verb): a /dev/nvidiaN device node, unless CUDA_VISIBLE_DEVICES hides them all."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    return any(p.name[len("nvidia"):].isdigit() for p in Path("/dev").glob("nvidia*"))


@rule("qlora_needs_cuda",
      "peft=qlora: bitsandbytes' 4-bit (NF4) weights need a CUDA GPU and bitsandbytes installed; refused elsewhere")
def _qlora_cuda(spec, env) -> Optional[str]:
    if spec.blocks["peft"].name != "qlora":
        return None
    from effitrain.config.blocks.optimizer_lowmem import bnb_version

    if bnb_version() is None:
        return ("peft=qlora quantises the base with bitsandbytes, which is not installed; install it "
                "(pip install 'effitrain[methods]') on a CUDA machine, or use +recipe=lora (LoRA on a full-precision "
                "base)")
    # at launch the device is known; in `effitrain check` (device unknown) the local machine is asked, torch-free
    device = env.device_type or ("cuda" if cuda_device_visible() else "cpu")
    if device != "cuda":
        return (f"peft=qlora stores the frozen base as 4-bit NF4 through bitsandbytes, whose 4-bit kernels need a "
                f"CUDA GPU, and this {'machine has none' if env.device_type is None else f'run is on {device}'}; "
                f"run it on a GPU, or use +recipe=lora here (the same LoRA on a full-precision base)")
    return None
