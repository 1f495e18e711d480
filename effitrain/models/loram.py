"""LoRAM (Zhang et al., "Train Small, Infer Large", 2502.13533): train LoRA on a structurally pruned model, then
recover the adapter to the full model's shapes and use it with the full model.

Two pipeline transforms (effitrain/pipeline.py):

* :func:`loram_prune` - the structured variant (LoRAM-Stru: LLM-Pruner's first-order Taylor importance on a few
  calibration rows; LoRAM-Rand with ``criterion: random``): in every decoder
  layer the same number of key/value head groups (each with the query heads that share it, and the matching
  columns of ``o_proj``) and of FFN channels (rows of ``gate_proj``/``up_proj``, columns of ``down_proj``) is
  removed; the hidden size, embeddings and norms are kept.  The kept indices travel with the pruned model in its
  ``config.json`` (``loram_pruning``), so the trained stage's final model still says where it came from.
* :func:`loram_recover` - the adapter trained on the pruned model is scattered back into the full shapes, zeros at
  the pruned positions (the authors' ``zeroA`` recovery in ``3_recovered_low_rank_matrix_generation.py``): rows of
  ``lora_B`` for q/k/v/gate/up, columns of ``lora_A`` for o/down.  The full model with the recovered adapter is
  merged (``W + scale * B A``) and handed on.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

import torch

from effitrain.registry import ConfigError

RECORD = "loram_pruning"  # the config.json field that carries the kept indices

_LAYER = re.compile(r"layers\.(\d+)\.")
# what each projection's LoRA factor indexes: (factor, its dimension, the pruned structure it follows)
_RECOVERY = {"q_proj": ("lora_B", 0, "q"), "k_proj": ("lora_B", 0, "kv"), "v_proj": ("lora_B", 0, "kv"),
             "o_proj": ("lora_A", 1, "q"), "gate_proj": ("lora_B", 0, "ffn"), "up_proj": ("lora_B", 0, "ffn"),
             "down_proj": ("lora_A", 1, "ffn")}


def _attention_shape(config: Any) -> tuple[int, int, int]:
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv, head_dim


def _layers(model: torch.nn.Module) -> Any:
    from effitrain.models.transforms import decoder_layers

    return decoder_layers(model)[1]


def taylor_gradients(model: torch.nn.Module, batches: list[torch.Tensor]) -> None:
    """Leave in every weight's ``.grad`` the gradient of the language-model loss summed over ``batches`` (token id
    rows): what LLM-Pruner's first-order Taylor importance multiplies the weights by."""
    model.eval()  # no dropout: the gradient of the model as it is
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(True)
    for ids in batches:
        model(input_ids=ids, labels=ids).loss.backward()


def calibration_batches(source: Path, samples: int, seq_len: int, seed: int) -> list[torch.Tensor]:
    """``samples`` rows of ``seq_len`` tokens from the built-in demo corpus (LLM-Pruner draws 10 rows of 64 tokens
    of BookCorpus), tokenized by the model's own tokenizer."""
    from transformers import AutoTokenizer

    from effitrain.data.demo import make_demo_docs

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError):
        raise ConfigError(f"transform.loram_prune: criterion taylor needs the model's tokenizer, and {source} has "
                          f"none; use criterion l2 or random") from None
    docs, _ = make_demo_docs(max_docs_per_domain=max(samples, 4), eval_examples_per_domain=0, seed=seed)
    rows = []
    for doc in sorted(docs, key=lambda d: d["id"]):
        ids = tokenizer(doc["text"])["input_ids"]
        if len(ids) >= seq_len:
            rows.append(torch.tensor([ids[:seq_len]]))
        if len(rows) == samples:
            break
    return rows


def group_importance(model: torch.nn.Module, criterion: str, seed: int) -> list[dict[str, torch.Tensor]]:
    """Per layer the importance of every key/value head group and every FFN channel, each element's importance
    summed over everything the group owns (q/k/v rows and o columns; gate/up rows and the down column): ``taylor``
    ``|w · dL/dw|`` (LLM-Pruner's first-order Taylor, ``param_first``; the gradients must be in ``.grad``, see
    :func:`taylor_gradients`); ``l2`` ``w²`` (LLM-Pruner's magnitude importance); ``random`` draws them
    (LoRAM-Rand)."""
    heads, kv, head_dim = _attention_shape(model.config)
    per_group = heads // kv
    generator = torch.Generator().manual_seed(seed)
    scores = []
    for layer in _layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        if criterion == "random":
            scores.append({"kv": torch.rand(kv, generator=generator),
                           "ffn": torch.rand(mlp.gate_proj.out_features, generator=generator)})
            continue
        if criterion == "taylor":
            sq = lambda w: (w.detach().float() * w.grad.float()).abs()  # noqa: E731
        else:
            sq = lambda w: w.detach().float() ** 2  # noqa: E731
        q = sq(attn.q_proj.weight).sum(1).view(kv, per_group * head_dim).sum(1)
        o = sq(attn.o_proj.weight).sum(0).view(kv, per_group * head_dim).sum(1)
        k = sq(attn.k_proj.weight).sum(1).view(kv, head_dim).sum(1)
        v = sq(attn.v_proj.weight).sum(1).view(kv, head_dim).sum(1)
        ffn = sq(mlp.gate_proj.weight).sum(1) + sq(mlp.up_proj.weight).sum(1) + sq(mlp.down_proj.weight).sum(0)
        scores.append({"kv": q + o + k + v, "ffn": ffn})
    return scores


def plan_pruning(model: torch.nn.Module, ratio: float, criterion: str, seed: int = 0) -> dict[str, Any]:
    """Which key/value groups and FFN channels every layer keeps: the same numbers in every layer (a Hugging Face
    config has one head count and one FFN width), the most important ones, in their original order."""
    heads, kv, head_dim = _attention_shape(model.config)
    ffn = model.config.intermediate_size
    keep_kv = max(1, kv - round(ratio * kv))
    keep_ffn = max(1, ffn - round(ratio * ffn))
    kept_kv, kept_ffn = [], []
    for score in group_importance(model, criterion, seed):
        kept_kv.append(sorted(torch.topk(score["kv"], keep_kv).indices.tolist()))
        kept_ffn.append(sorted(torch.topk(score["ffn"], keep_ffn).indices.tolist()))
    return {"criterion": criterion, "ratio": ratio,
            "full": {"num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": head_dim,
                     "intermediate_size": ffn},
            "kept_kv_heads": kept_kv, "kept_channels": kept_ffn}


def kept_rows(plan: dict[str, Any], layer: int, what: str) -> torch.Tensor:
    """Indices, in the full model, of the rows a pruned layer keeps: of q (and o's columns), of k/v, of the FFN."""
    full = plan["full"]
    head_dim, per_group = full["head_dim"], full["num_attention_heads"] // full["num_key_value_heads"]
    if what == "ffn":
        return torch.tensor(plan["kept_channels"][layer], dtype=torch.long)
    groups = plan["kept_kv_heads"][layer]
    width = head_dim * (per_group if what == "q" else 1)
    return torch.cat([torch.arange(g * width, (g + 1) * width) for g in groups])


def prune_model(model: torch.nn.Module, plan: dict[str, Any]) -> torch.nn.Module:
    """The pruned copy of ``model``: every kept weight is the full model's, sliced; the config records ``plan``."""
    from transformers import AutoModelForCausalLM

    full = plan["full"]
    keep_kv = len(plan["kept_kv_heads"][0])
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.num_key_value_heads = keep_kv
    config.num_attention_heads = keep_kv * (full["num_attention_heads"] // full["num_key_value_heads"])
    config.head_dim = full["head_dim"]  # no longer hidden_size / heads
    config.intermediate_size = len(plan["kept_channels"][0])
    setattr(config, RECORD, plan)
    pruned = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {}
    for key, tensor in model.state_dict().items():
        match = _LAYER.search(key)
        module = next((m for m in _RECOVERY if f".{m}." in key), None)
        if match is None or module is None:
            state[key] = tensor
            continue
        layer = int(match.group(1))
        _, dim, what = _RECOVERY[module]
        if key.endswith(".bias") and dim == 1:  # o_proj/down_proj bias: per output (hidden), not pruned
            state[key] = tensor
            continue
        dim = 0 if key.endswith(".bias") else dim
        state[key] = tensor.index_select(dim, kept_rows(plan, layer, what)).clone()
    missing, unexpected = pruned.load_state_dict(state, strict=False)
    from effitrain.models.transforms import _tied_keys

    missing = [k for k in missing if k not in _tied_keys(pruned)]
    if missing or unexpected:
        raise RuntimeError(f"loram_prune: state mismatch (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return pruned


def recover_lora_state(state: dict[str, torch.Tensor], plan: dict[str, Any],
                       full_shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The adapter trained on the pruned model, in the full model's shapes: each pruned factor is scattered into
    zeros at the kept positions (``full_shapes``: the full model's shape of every adapter key)."""
    out = {}
    for key, tensor in state.items():
        module = next((m for m in _RECOVERY if f".{m}." in key), None)
        match = _LAYER.search(key)
        if module is None or match is None or _RECOVERY[module][0] not in key:
            out[key] = tensor  # the factor that spans the (unpruned) hidden size, or no decoder projection
            continue
        _, dim, what = _RECOVERY[module]
        full = torch.zeros(full_shapes[key], dtype=tensor.dtype)
        full.index_copy_(dim, kept_rows(plan, int(match.group(1)), what), tensor)
        out[key] = full
    return out


def _load(source: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)


def loram_prune(params: Any, source: Path) -> tuple[Any, dict[str, Any]]:
    model = _load(source)
    if model.config.model_type not in ("llama", "mistral", "qwen2", "qwen3"):
        raise ConfigError(f"transform.loram_prune: a {model.config.model_type} model cannot be pruned; supported: "
                          f"llama-style decoders (llama, mistral, qwen2, qwen3)")
    if params.criterion == "taylor":
        taylor_gradients(model, calibration_batches(source, params.calibration_samples, params.calibration_len,
                                                    params.seed))
    plan = plan_pruning(model, params.ratio, params.criterion, params.seed)
    model.zero_grad(set_to_none=True)
    pruned = prune_model(model, plan)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return pruned, {"criterion": params.criterion, "ratio": params.ratio, "params_full": count(model),
                    "params_pruned": count(pruned),
                    "kv_heads": f"{plan['full']['num_key_value_heads']} -> {len(plan['kept_kv_heads'][0])}",
                    "ffn": f"{plan['full']['intermediate_size']} -> {len(plan['kept_channels'][0])}"}


def read_plan(source: Path) -> Optional[dict[str, Any]]:
    config = source / "config.json"
    return json.loads(config.read_text()).get(RECORD) if config.is_file() else None


def recovered_model(full_model: torch.nn.Module, adapter_dir: Path, plan: dict[str, Any]) -> torch.nn.Module:
    """The full model with the recovered adapter attached (a PeftModel, not merged)."""
    from peft import PeftConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    config = PeftConfig.from_pretrained(str(adapter_dir))
    if str(getattr(config.peft_type, "value", config.peft_type)) != "LORA" or getattr(config, "use_dora", False):
        raise ConfigError(f"transform loram_recover: the adapter in {adapter_dir} is {config.peft_type}"
                          f"{' (DoRA)' if getattr(config, 'use_dora', False) else ''}; LoRAM recovers a plain LoRA "
                          f"(train the pruned stage with peft=lora)")
    config.inference_mode = False
    model = get_peft_model(full_model, config)
    pruned_state = load_file(str(adapter_dir / "adapter_model.safetensors"))
    shapes = {}
    for name, tensor in model.state_dict().items():
        # peft saves 'lora_A.weight' for the live 'lora_A.default.weight'
        shapes[name.replace(".default.", ".")] = tuple(tensor.shape)
    shapes = {k: shapes[k] for k in pruned_state if k in shapes}
    missing = [k for k in pruned_state if k not in shapes]
    if missing:
        raise ConfigError(f"transform loram_recover: adapter keys {missing[:2]} are not in the full model; was the "
                          f"adapter trained on a pruned copy of this model?")
    result = set_peft_model_state_dict(model, recover_lora_state(pruned_state, plan, shapes))
    if getattr(result, "unexpected_keys", None):
        raise RuntimeError(f"loram_recover: unexpected adapter keys {result.unexpected_keys[:3]}")
    return model


def loram_recover(params: Any, source: Path) -> tuple[Any, dict[str, Any]]:
    plan = read_plan(source)
    if plan is None:
        raise ConfigError(f"transform loram_recover: {source} was not pruned by transform loram_prune (no "
                          f"'{RECORD}' in its config.json); recover the stage that trained on the pruned model")
    adapter = source / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise ConfigError(f"transform loram_recover: {source} holds no adapter (no adapter/adapter_config.json); "
                          f"the pruned stage must train peft=lora")
    full = _load(Path(params.full))
    heads, kv, head_dim = _attention_shape(full.config)
    got = {"num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": head_dim,
           "intermediate_size": full.config.intermediate_size}
    if got != plan["full"] or len(_layers(full)) != len(plan["kept_kv_heads"]):
        raise ConfigError(f"transform.full: {params.full} is not the model that was pruned ({got} and "
                          f"{len(_layers(full))} layers; the pruned model came from {plan['full']} and "
                          f"{len(plan['kept_kv_heads'])} layers)")
    merged = recovered_model(full, adapter, plan).merge_and_unload()
    return merged, {"full": str(params.full), "adapter": str(adapter), "criterion": plan["criterion"],
                    "ratio": plan["ratio"]}
