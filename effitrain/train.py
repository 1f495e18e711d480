"""Assemble a run from a validated config: blocks -> objects -> DeepSpeed engine -> Trainer -> run directory.

Data flows one way: config, then data (source, selection, tokenizer, packing, sampler), then model, adapters,
optimizer and schedule, then the DeepSpeed engine and the loop.  Nothing here knows which recipe is running.
"""

from __future__ import annotations

import json
import logging
import random
import sys
import time
from pathlib import Path
from typing import Any, Optional

from effitrain.config.spec import RunSpec, validate
from effitrain.registry import ConfigError

log = logging.getLogger("effitrain")


def deepspeed_config(spec: RunSpec, precision_section: dict, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON config, generated from the train, precision and parallelism blocks."""
    t = spec.train
    global_batch = t.micro_batch_size * t.grad_accum * world_size
    if t.global_batch_size is not None and t.global_batch_size != global_batch:
        raise ConfigError(f"train.global_batch_size: {t.global_batch_size} != micro_batch_size {t.micro_batch_size} "
                          f"x grad_accum {t.grad_accum} x world size {world_size} = {global_batch}")
    return {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.clip_grad_norm,
        "zero_optimization": spec.block("parallelism").build(),
        **precision_section,
        # our optimizers are ordinary torch optimizers handed to DeepSpeed ("client optimizers")
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,  # the loop does its own logging
        "wall_clock_breakdown": False,
    }


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _config_yaml(cfg: dict) -> str:
    import yaml

    return yaml.safe_dump(cfg, sort_keys=False)


def train(cfg: dict[str, Any], *, run_dir: Optional[Path] = None, argv: Optional[list[str]] = None,
          recipes: Optional[list[dict]] = None) -> dict[str, Any]:
    """Train from a resolved config mapping; returns the summary (also written to ``summary.json``)."""
    spec = validate(cfg, recipes)
    run_dir = Path(run_dir or spec.run_dir or "outputs/run")

    from effitrain.parallel.dist import dist_env
    env = dist_env()

    import os

    import torch
    # name the accelerator ourselves: DeepSpeed's auto-detection warns on every CPU start
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import datasets
    import deepspeed
    import torch.distributed as dist

    datasets.disable_progress_bars()  # the run's own progress bar and log lines are the console output
    import transformers
    transformers.utils.logging.disable_progress_bar()

    from effitrain.config.rules import Environment, check_rules
    from effitrain.engine.events import EventBus
    from effitrain.engine.guard import NonFiniteGuard
    from effitrain.engine.loop import Trainer
    from effitrain.engine.rundir import (check_run_dir, prepare_run_dir, resolve_resume, truncate_metrics,
                                         write_run_record)
    from effitrain.engine.state import State
    from effitrain.paths import cache_dir

    accelerator = deepspeed.get_accelerator()
    device_type = accelerator.device_name()
    runtime_env = Environment(device_type=device_type, world_size=env.world_size,
                              bf16_supported=bool(accelerator.is_bf16_supported()),
                              fp8_supported=bool(device_type == "cuda" and torch.cuda.get_device_capability() >= (8, 9)))
    check_rules(spec, runtime_env)
    precision = spec.block("precision").build(device_type=device_type,
                                              bf16_supported=bool(runtime_env.bf16_supported))
    ds_config = deepspeed_config(spec, precision.ds_config, env.world_size)

    is_main = env.rank == 0
    check_run_dir(run_dir, resume=spec.resume, overwrite=spec.overwrite)  # read-only, so every rank agrees
    deepspeed.init_distributed(dist_backend="nccl" if device_type == "cuda" else "gloo", verbose=False)
    if device_type == "cuda":
        torch.cuda.set_device(env.local_rank)
    world = env.world_size

    def barrier() -> None:
        if world > 1:
            dist.barrier()

    if is_main:
        prepare_run_dir(run_dir, overwrite=spec.overwrite, resume=spec.resume)
        write_run_record(run_dir, config_yaml=_config_yaml(dict(cfg)), argv=argv or sys.argv, world_size=world)
    barrier()
    resume_from = resolve_resume(run_dir, spec.resume)
    _seed_everything(spec.train.seed)

    # ---- data: source -> selection -> tokenizer -> packing.  Rank 0 fills the caches first, the others reuse them.
    from effitrain.data.packing import to_numpy, build_packed_splits

    t0 = time.perf_counter()
    selection = None
    packed = None
    for turn in ((0,) if world == 1 else (0, 1)):
        if (turn == 0) == is_main:
            pool = spec.block("dataset").build()
            selection = spec.block("selection").build(pool, cache_dir=cache_dir("selection"), seed=spec.train.seed)
            from datasets import DatasetDict
            packed = build_packed_splits(spec.block("dataset").params, spec.block("model").params,
                                         DatasetDict(train=selection.train, eval=pool["eval"]),
                                         tokenizer_corpus=pool["train"])
        barrier()
    tokenizer, packed_train, packed_eval = packed
    train_ids = to_numpy(packed_train)
    eval_sets = {domain: to_numpy(ds) for domain, ds in sorted(packed_eval.items())}
    seq_len = spec.block("dataset").params.seq_len
    if len(train_ids) < ds_config["train_batch_size"]:
        raise ConfigError(f"dataset: only {len(train_ids)} packed sequences of {seq_len} tokens, fewer than one "
                          f"global batch ({ds_config['train_batch_size']}); lower train.micro_batch_size or seq_len")
    data_seconds = time.perf_counter() - t0

    # ---- model, adapters, optimizer, schedule
    _seed_everything(spec.train.seed)
    model = spec.block("model").build(tokenizer=tokenizer)
    model = spec.block("peft").build(model)
    optimizer = spec.block("optimizer").build(model)
    scheduler = spec.block("scheduler").build(optimizer, max_steps=spec.train.max_steps)
    guard = NonFiniteGuard(spec.train.max_bad_steps)
    guard.install(optimizer)

    sampler = spec.block("curriculum").build(packed_train, seed=spec.train.seed,
                                             micro_batch_size=spec.train.micro_batch_size,
                                             grad_accum=spec.train.grad_accum, world_size=world, rank=env.rank)
    hooks = [m.build() for m in spec.methods.values()]
    if getattr(sampler, "hook", None) is not None:
        hooks.insert(0, sampler.hook)
    bus = EventBus(hooks)

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config, dist_init_required=False)
    state = State(spec=spec, run_dir=run_dir, rank=env.rank, world_size=world, model=engine.module, engine=engine,
                  optimizer=optimizer, scheduler=scheduler, sampler=sampler)

    final_dir = run_dir / "final_model"

    def save_final_model() -> None:
        if not spec.train.save_final_model:
            return
        from effitrain.peft.adapters import export_final_model

        if spec.block("parallelism").params.stage == 3:  # gather the partitioned parameters onto every rank
            with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
                if is_main:
                    export_final_model(engine.module, tokenizer, final_dir)
        elif is_main:
            export_final_model(engine.module, tokenizer, final_dir)
        barrier()

    from effitrain.loggers.sinks import Sinks

    trainer = Trainer(state=state, bus=bus, packed_train=train_ids, eval_sets=eval_sets, sinks=Sinks([]),
                      guard=guard, seq_len=seq_len, save_final_model=save_final_model)
    start_step = 0
    if resume_from is not None:
        trainer.load_checkpoint(resume_from)
        start_step = state.step
        if is_main:
            truncate_metrics(run_dir / "metrics.jsonl", start_step)
            print(f"resumed from {resume_from} at step {start_step}", flush=True)
    if is_main:
        trainer.sinks = Sinks(spec.block("logger").build(run_dir=run_dir, max_steps=spec.train.max_steps,
                                                         start_step=start_step, config=dict(cfg)))

    if start_step >= spec.train.max_steps:
        outcome = {"finished": True, "stopped_by": None, "train_seconds": trainer._train_seconds}
        trainer.sinks.close()
        state.eval_metrics = trainer.evaluate()
    else:
        outcome = trainer.fit()

    from effitrain.memory import memory_report

    memory = memory_report(engine.module, optimizer)
    summary = {
        "final_eval_loss": state.eval_metrics.get("eval_loss"),
        "eval_losses": {k.split("/", 1)[1]: v for k, v in state.eval_metrics.items() if "/" in k},
        "steps": state.step,
        "tokens": state.tokens,
        "tokens_per_s": state.tokens / outcome["train_seconds"] if outcome["train_seconds"] else 0.0,
        "train_seconds": outcome["train_seconds"],
        "data_seconds": data_seconds,
        **memory,
        "recipe": [r.name for r in spec.recipes],
        "world_size": world,
        "zero_stage": spec.block("parallelism").params.stage,
        "precision": precision.mode,
        "device": device_type,
        "global_batch_size": ds_config["train_batch_size"],
        "seq_len": seq_len,
        "skipped_steps": guard.total_skipped,
        "finished": outcome["finished"],
        "stopped_by": outcome["stopped_by"],
        "selection": selection.info if selection is not None else None,
        "selection_manifest": str(selection.manifest_path) if selection is not None and selection.manifest_path
        else None,
        "final_model": str(final_dir) if outcome["finished"] and spec.train.save_final_model else None,
    }
    if is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        if outcome["stopped_by"]:
            print(f"stopped ({outcome['stopped_by']}) at step {state.step}; checkpoint saved, "
                  f"continue with resume=auto run_dir={run_dir}", flush=True)
    barrier()
    return summary
