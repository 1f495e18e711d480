"""``model=demo_base``: fine-tuning recipes start from a model that has learned something.

A fine-tuning method (LoRA and its relatives, LISA) applied to a randomly initialised model barely moves the loss,
which reads as a bug.  When the user names no model to fine-tune, this builder first pre-trains a small Llama on the
run's own data with a plain recipe (AdamW, cosine, ``base_steps`` steps) — a real effitrain run, in
``$EFFITRAIN_CACHE/base_models/KEY`` — and returns its final model.  The key hashes everything that decides the
base model (its shape, the dataset block, the tokenizer's vocabulary, steps, lr, seed), so the next run with the same
inputs reuses it.  To fine-tune a model of your own instead: ``model=pretrained model.path=FOLDER``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
from typing import Any

from effitrain.console import say
from effitrain.registry import ConfigError

_SHAPE = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "max_position_embeddings",
          "rope_theta", "tie_word_embeddings", "tokenizer", "vocab_size", "attn_implementation")


def base_run_config(cfg: dict[str, Any], params: Any) -> dict[str, Any]:
    """The base model's own run: the outer run's data and train settings, a plain Llama, AdamW, cosine."""
    from effitrain.config.compose import compose_config

    base = compose_config([]).cfg
    base["dataset"] = copy.deepcopy(cfg["dataset"])
    base["model"] = {"name": "llama", **{k: getattr(params, k) for k in _SHAPE},
                     "gradient_checkpointing": False}
    base["optimizer"]["lr"] = params.base_lr
    base["train"].update(max_steps=params.base_steps, seed=cfg["train"]["seed"], eval_every=0,
                         micro_batch_size=cfg["train"]["micro_batch_size"], save_every=0, save_every_minutes=0,
                         log_every=max(1, params.base_steps // 5), keep_checkpoints=1)
    base["logger"] = {"name": "console", "progress_bar": False}
    base["precision"] = copy.deepcopy(cfg["precision"])
    base.pop("recipe", None)
    return base


def _finished(folder) -> bool:
    try:
        return bool(json.loads((folder / "summary.json").read_text()).get("finished"))
    except (OSError, ValueError, AttributeError):
        return False


@contextlib.contextmanager
def _only_builder(folder):
    """One launch at a time pre-trains a given base model; another that needs the same one waits for it (and says
    so), then reuses it -- two sweeps or test workers that start together once made the second refuse ("run_dir ...
    is in use by a live run").  Rank 0 holds the lock for the job; the other ranks wait at a barrier until it does,
    so every rank then reads the same answer from the cache and trains the base model together, or none does."""
    import torch.distributed as dist
    from filelock import FileLock, Timeout

    lock = FileLock(str(folder.parent / f"{folder.name}.lock"))
    is_main = not dist.is_initialized() or dist.get_rank() == 0
    if is_main:
        try:
            lock.acquire(timeout=0)
        except Timeout:
            say(f"model=demo_base: another launch is pre-training this base model ({folder}); waiting for it")
            lock.acquire()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    try:
        yield
    finally:
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
        if is_main:
            lock.release()


def build_demo_base(params: Any, *, tokenizer: Any, run: Any = None):
    from transformers import AutoModelForCausalLM

    from effitrain.models.build import build_llama

    if run is None:  # rebuilding the architecture only (export): the weights come from a checkpoint
        return build_llama(params, tokenizer=tokenizer)
    from effitrain.paths import cache_dir

    cfg = base_run_config(run.cfg, params)
    vocab = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()
    key = hashlib.sha256(json.dumps({"cfg": {k: cfg[k] for k in ("dataset", "model", "optimizer", "scheduler")},
                                     "train": cfg["train"], "vocab": vocab}, sort_keys=True, default=str).encode())
    folder = cache_dir("base_models") / key.hexdigest()[:16]
    final = folder / "final_model"
    with _only_builder(folder):
        if _finished(folder):
            say(f"model=demo_base: reusing the base model pre-trained on this data ({final})")
        else:
            say(f"model=demo_base: no model to fine-tune was given (model=pretrained model.path=...), so a base "
                f"model is pre-trained on this run's data first: {params.base_steps} steps, cached in {folder}")
            cfg.update(run_dir=str(folder), overwrite=folder.exists())  # an unfinished earlier attempt is replaced
            summary = run.train(cfg, run_dir=folder, argv=["effitrain (model=demo_base)"], recipes=[])
            if not summary.get("finished"):
                raise ConfigError(f"model=demo_base: the base model's pre-training did not finish "
                                  f"({summary.get('stopped_by')})")
            say(f"model=demo_base: base model ready (eval loss {summary.get('final_eval_loss'):.3f}); fine-tuning it")
    model = AutoModelForCausalLM.from_pretrained(str(final))
    if model.get_input_embeddings().num_embeddings != len(tokenizer):
        raise ConfigError("model=demo_base: the cached base model's vocabulary does not match this run's tokenizer")
    from effitrain.models.switches import apply_model_switches

    return apply_model_switches(model, params)
