"""Assemble a run from a validated config: blocks -> objects -> DeepSpeed engine -> Trainer -> run directory.

Data flows one way: config, then data (source, selection, tokenizer, packing, sampler), then model, adapters,
optimizer and schedule, then the DeepSpeed engine and the loop.  Nothing here knows which recipe is running.
Everything that can fail on bad input (files, the device, the world size, data too small for a batch) is built
before the run directory is created, so a bad launch leaves no half-made run behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from effitrain.config.spec import RunSpec, validate
from effitrain.registry import ConfigError


def deepspeed_config(spec: RunSpec, precision_section: dict, data_parallel_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON config, generated from the train, precision and parallelism blocks.  The global batch
    counts the processes that train on different rows (the world size, less sequence parallelism's sharing)."""
    t = spec.train
    global_batch = t.micro_batch_size * t.grad_accum * data_parallel_size
    if t.global_batch_size is not None and t.global_batch_size != global_batch:
        raise ConfigError(f"train.global_batch_size: {t.global_batch_size} != micro_batch_size {t.micro_batch_size} "
                          f"x grad_accum {t.grad_accum} x data-parallel processes {data_parallel_size} = {global_batch}")
    sequence_parallel = getattr(spec.block("parallelism").params, "sequence_parallel_size", 1)
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
        **({"sequence_parallel_size": sequence_parallel} if sequence_parallel > 1 else {}),
    }


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Launch:
    """Where this process runs: its rank in the world and what the device supports."""
    rank: int
    local_rank: int
    world_size: int
    device_type: str
    bf16_supported: bool
    barrier: Callable[[], None]
    sequence_parallel_size: int = 1  # processes that split each sequence (DeepSpeed-Ulysses); 1 = off

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def data_parallel_size(self) -> int:
        """Processes that train on different rows: the processes of one sequence-parallel group share rows."""
        return self.world_size // self.sequence_parallel_size

    @property
    def data_parallel_rank(self) -> int:
        return self.rank // self.sequence_parallel_size

    def main_first(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on rank 0, then on the other ranks: rank 0 fills the caches that the others then reuse."""
        result = fn() if self.is_main else None
        self.barrier()
        if not self.is_main:
            result = fn()
        self.barrier()
        return result


def _launch(spec: RunSpec) -> Launch:
    from effitrain.parallel.dist import dist_env, init_process_group

    env = dist_env()
    import torch
    # name the accelerator ourselves: DeepSpeed's auto-detection warns on every CPU start
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import datasets
    import deepspeed
    import torch.distributed as dist
    import transformers

    from effitrain.config.rules import Environment, check_rules

    datasets.disable_progress_bars()  # the run's own progress bar and log lines are the console output
    transformers.utils.logging.disable_progress_bar()
    accelerator = deepspeed.get_accelerator()
    device_type = accelerator.device_name()
    bf16 = bool(accelerator.is_bf16_supported())
    fp8 = device_type == "cuda" and torch.cuda.get_device_capability() >= (8, 9)
    check_rules(spec, Environment(device_type=device_type, world_size=env.world_size, bf16_supported=bf16,
                                  fp8_supported=fp8))
    if device_type == "cuda":
        torch.cuda.set_device(env.local_rank)

    init_process_group(device_type)

    def barrier() -> None:
        if env.world_size > 1:
            dist.barrier()

    return Launch(env.rank, env.local_rank, env.world_size, device_type, bf16, barrier,
                  sequence_parallel_size=getattr(spec.block("parallelism").params, "sequence_parallel_size", 1))


@dataclass
class RunContext:
    """What a model builder may need beyond its own parameters: the whole run (``model=demo_base`` pre-trains on
    the run's data)."""
    cfg: dict[str, Any]
    spec: RunSpec
    tokenizer: Any
    #: trains a nested run (:func:`train`): handed to the builder so that models/ need not import the layer above
    train: Callable[..., dict[str, Any]]


def _resolve_timeline(spec: RunSpec, launch: Launch, data: "Data") -> Any:
    """The run's timeline in optimizer steps (tokens per step: the global batch times the packed length)."""
    global_batch = spec.train.micro_batch_size * spec.train.grad_accum * launch.data_parallel_size
    return spec.timeline.resolve(max_steps=spec.train.max_steps,
                                 tokens_per_step=global_batch * int(data.train_ids.shape[-1]))


def _if_accepted(block: Any, **context: Any) -> dict[str, Any]:
    """The optional context a builder declares in its signature (a plugin's builder written for an older
    effitrain, ``build(params, *, tokenizer)``, keeps working)."""
    import inspect

    parameters = inspect.signature(block.entry.load_builder()).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return context
    return {k: v for k, v in context.items() if k in parameters}


@dataclass
class Data:
    tokenizer: Any
    packed_train: Any          # datasets.Dataset of packed rows (what the curriculum orders)
    train_ids: Any             # numpy [rows, seq_len] view of packed_train
    eval_sets: dict[str, Any]  # domain -> numpy [rows, seq_len]
    selection: Any             # effitrain.selection.base.Selection
    seconds: float


def _build_data(spec: RunSpec, launch: Launch) -> Data:
    """source -> selection -> tokenizer (trained on the whole pool) -> packing (``effitrain prepare`` builds the same,
    and the run then finds it in the caches)."""
    from effitrain.data.packing import to_numpy
    from effitrain.prepare import build_run_data

    start = time.perf_counter()
    selection, (tokenizer, packed_train, packed_eval) = launch.main_first(lambda: build_run_data(spec))
    train_ids = to_numpy(packed_train)
    global_batch = spec.train.micro_batch_size * spec.train.grad_accum * launch.data_parallel_size
    if len(train_ids) < global_batch:
        raise ConfigError(f"dataset: only {len(train_ids)} packed sequences of {train_ids.shape[-1]} tokens, fewer "
                          f"than one global batch ({global_batch}); lower train.micro_batch_size or dataset.seq_len")
    eval_sets = {domain: to_numpy(ds) for domain, ds in sorted(packed_eval.items())}
    return Data(tokenizer, packed_train, train_ids, eval_sets, selection, time.perf_counter() - start)


def _final_model_writer(spec: RunSpec, launch: Launch, engine: Any, tokenizer: Any, out_dir: Path) -> Callable:
    def save_final_model() -> None:
        if not spec.train.save_final_model:
            return
        import deepspeed

        from effitrain.peft.adapters import export_final_model

        if spec.block("parallelism").params.stage == 3:  # gather the partitioned parameters onto every rank
            with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
                if launch.is_main:
                    export_final_model(engine.module, tokenizer, out_dir)
        elif launch.is_main:
            export_final_model(engine.module, tokenizer, out_dir)
        launch.barrier()

    return save_final_model


def _largest_state(report: dict[str, int], at_first_step: Optional[int]) -> dict[str, int]:
    """``optimizer_state_bytes`` is the larger of the state right after the first step and at the end: a method
    that clears the state on a schedule (low_rank_refresh's momentum reset, due on the last step of a 100-step run)
    holds the full state in between.  The end's value stays as ``optimizer_state_bytes_at_end``."""
    if "optimizer_state_bytes" not in report:
        return report
    end = report["optimizer_state_bytes"]
    return {**report, "optimizer_state_bytes": max(end, at_first_step or 0), "optimizer_state_bytes_at_end": end}


def _with_training_state(report: dict[str, int], gradient_bytes: int) -> dict[str, int]:
    """A memory report plus ``training_state_bytes``: what the method decides -- weights, gradients, optimizer state,
    master copies -- read from the tensors.  The process peak also holds the interpreter, the libraries, the data
    and the activations, so on a CPU it hides a method's saving (GaLore's state is 6.2 MB to AdamW's 10.1 MB on the
    default model, while both processes peak near 800 MB)."""
    state = (report["parameter_bytes"] + report.get("optimizer_state_bytes", 0)
             + report.get("master_weight_bytes", 0) + gradient_bytes)
    return {**report, "training_state_bytes": state}


_NESTED: list[Path] = []  # the run directories of the runs in progress in this process, outermost first


@contextlib.contextmanager
def in_progress(run_dir: Path) -> Iterator[None]:
    """Mark ``run_dir`` as a run in progress in this process for the time of the block: a run inside another (a
    pipeline's stage, ``model=demo_base``'s pre-training) leaves the log and the peak-memory figures to the outer
    one, and a stopped stage tells the user to resume the pipeline's folder."""
    _NESTED.append(run_dir)
    try:
        yield
    finally:
        _NESTED.pop()


def train(cfg: dict[str, Any], *, run_dir: Optional[Path] = None, argv: Optional[list[str]] = None,
          recipes: Optional[list[dict]] = None, on_started: Optional[Callable[[], None]] = None) -> dict[str, Any]:
    """Train one run from a resolved config mapping; returns the summary (also written to ``summary.json``).

    Everything that can refuse the configuration is built first; only then is the run directory taken (locked,
    marked, an old run moved aside for ``overwrite=true``).  From there on any failure still leaves a
    ``summary.json`` that says why the run stopped, and the lock is released however the process ends.
    ``on_started`` is called once, after the first optimizer step (a pipeline replaces the one it overwrites then).
    A multi-stage recipe is several runs: :func:`effitrain.pipeline.run` trains it, calling this once per stage.
    """
    spec = validate(cfg, recipes)
    if spec.stages:
        raise ValueError("train() trains one run; a config with stages: runs through effitrain.pipeline.run")
    run_dir = Path(run_dir or spec.run_dir or "outputs/run")
    with in_progress(run_dir):
        return _train(cfg, spec, run_dir, argv, on_started)


def _train(cfg: dict[str, Any], spec: RunSpec, run_dir: Path, argv: Optional[list[str]],
           on_started: Optional[Callable[[], None]] = None) -> dict[str, Any]:
    from effitrain.console import attach_log, say
    from effitrain.config.resume import check_resume_config, nothing_to_resume
    from effitrain.engine.rundir import RunDirLock, check_run_dir
    from effitrain.timeline_hooks import timeline_hooks

    check_run_dir(run_dir, resume=spec.resume, overwrite=spec.overwrite)  # read-only, so every rank agrees
    check_resume_config(run_dir, cfg, spec.resume, spec.recipes)
    finished = nothing_to_resume(run_dir, spec) if spec.resume == "auto" else None
    if finished is not None:  # before anything starts or is written: a finished run is left as it is
        say(finished.line)
        return finished.summary
    launch = _launch(spec)
    if len(_NESTED) == 1:  # the peak-memory figures are this run's, not an earlier sweep member's in this process
        from effitrain.engine.metrics import reset_peaks
        reset_peaks()
    say("building data ...")
    precision = spec.block("precision").build(device_type=launch.device_type, bf16_supported=launch.bf16_supported)
    ds_config = deepspeed_config(spec, precision.ds_config, launch.data_parallel_size)
    _seed_everything(spec.train.seed)
    data = _build_data(spec, launch)

    say("building model and optimizer ...")
    _seed_everything(spec.train.seed)
    run = RunContext(cfg, spec, data.tokenizer, train)
    model = spec.block("model").build(tokenizer=data.tokenizer, **_if_accepted(spec.block("model"), run=run))
    if precision.prepare_model is not None:  # e.g. fp8: linears become torchao Float8Linear (before adapters)
        model = precision.prepare_model(model)
    model = spec.block("peft").build(model)
    # before the optimizer: an objective may attach training-only modules to the model (FitNets' hint regressor)
    objective = _build_objective(spec, model, launch, data.tokenizer)
    optimizer = spec.block("optimizer").build(model, max_steps=spec.train.max_steps)
    timeline = _resolve_timeline(spec, launch, data)
    scheduler = spec.block("scheduler").build(optimizer, max_steps=spec.train.max_steps,
                                              **_if_accepted(spec.block("scheduler"), timeline=timeline))
    sampler = spec.block("curriculum").build(data.packed_train, seed=spec.train.seed,
                                             micro_batch_size=spec.train.micro_batch_size,
                                             grad_accum=spec.train.grad_accum,
                                             world_size=launch.data_parallel_size, rank=launch.data_parallel_rank,
                                             **_if_accepted(spec.block("curriculum"), timeline=timeline,
                                                            documents=data.selection.train, tokenizer=data.tokenizer))
    if spec.train.continue_data_from:  # a resume of this run loads its own checkpoint's sampler state over this
        continue_data_stream(sampler, Path(spec.train.continue_data_from))
    # the timeline's hooks before the methods', so a method's batch_start sees the batch the model will see
    hooks = ([sampler.hook] if getattr(sampler, "hook", None) is not None else []) + timeline_hooks(timeline) + \
        [m.build(**_if_accepted(m, tokenizer=data.tokenizer)) for m in spec.methods.values()] + \
        list(precision.hooks) + list(getattr(objective, "hooks", ()))  # e.g. grpo's weight push into its engine
    from effitrain.parallel import ulysses  # its groups and attention come last: nothing after them can refuse
    sequence_parallel = ulysses.enable(model, size=launch.sequence_parallel_size,
                                       micro_batch_size=spec.train.micro_batch_size)
    if sequence_parallel is not None:
        say(f"sequence parallel (DeepSpeed-Ulysses): {sequence_parallel.size} processes share each sequence of "
            f"{data.train_ids.shape[1]} tokens; {launch.data_parallel_size} data-parallel group(s)")

    # Everything that can refuse the configuration has been built: now the run directory may be taken.
    lock = RunDirLock(run_dir)
    if launch.is_main:
        lock.acquire(resume=spec.resume, overwrite=spec.overwrite)
    launch.barrier()
    if len(_NESTED) == 1:  # a run inside another (model=demo_base's pre-training) leaves the log to the outer one
        attach_log(run_dir, launch.rank)
    summary: dict[str, Any] = {"finished": False, "stopped_by": "failed before training started"}
    try:
        summary = _run(spec, cfg, argv, run_dir, launch, lock, data, precision, ds_config,
                       model, optimizer, scheduler, sampler, hooks, objective, sequence_parallel, on_started)
    except BaseException as exc:
        summary = {**summary, "finished": False, "failed": f"{type(exc).__name__}: {exc}".strip()}
        if isinstance(exc, KeyboardInterrupt):
            summary["stopped_by"] = "interrupted by Ctrl-C without saving the last steps"
        if launch.is_main:
            if lock.replacing:  # it never got going: the run it was to replace comes back
                lock.abandon_replacement()
            elif run_dir.is_dir():
                try:
                    _write_summary(run_dir, summary)
                except OSError:  # e.g. the disk that failed the run: the error itself still reaches the user
                    pass
        raise
    finally:
        lock.release()
        if sequence_parallel is not None:
            sequence_parallel.close()
    return summary


def _chained(*calls: Optional[Callable[[], None]]) -> Callable[[], None]:
    def call_all() -> None:
        for call in calls:
            if call is not None:
                call()
    return call_all


def continue_data_stream(sampler: Any, previous_run: Path) -> None:
    """Start ``sampler`` at the batch after the last one ``previous_run`` trained on (its newest checkpoint's
    sampler state).  The two runs must pack the same rows with the same global batch, or "the next batch" would be
    another dataset's."""
    from effitrain.engine.checkpoint import newest_sampler_state

    state = newest_sampler_state(previous_run)
    if state is None:
        raise ConfigError(f"train.continue_data_from: {previous_run} has no complete checkpoint whose data sampler "
                          f"state this run could continue from")
    try:
        sampler.load_state_dict(state)
    except ConfigError as exc:
        raise ConfigError(f"train.continue_data_from: this run's data cannot continue {previous_run}'s: "
                          f"{str(exc).removeprefix('resume: ')}") from None


def _build_objective(spec: RunSpec, model: Any, launch: Launch, tokenizer: Any) -> Any:
    """The objective, built on the trained model (after peft) on this process's device; a teacher it loads is
    checked here (folder, vocabulary, tokenizer), before the run directory is taken."""
    import torch

    device = torch.device(launch.device_type, launch.local_rank) if launch.device_type == "cuda" \
        else torch.device(launch.device_type)
    block = spec.block("objective")
    return block.build(**_if_accepted(block, model=model, device=device, bf16_supported=launch.bf16_supported,
                                      tokenizer=tokenizer, grad_accum=spec.train.grad_accum,
                                      world_size=launch.data_parallel_size,
                                      # objective: mixed builds its components' own data streams from these
                                      dataset_block=spec.block("dataset"), model_params=spec.block("model").params,
                                      micro_batch_size=spec.train.micro_batch_size))


def _write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    tmp = run_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1, default=str))
    tmp.replace(run_dir / "summary.json")


def _run(spec: RunSpec, cfg: dict[str, Any], argv: Optional[list[str]], run_dir: Path, launch: Launch, lock: Any,
         data: Data, precision: Any, ds_config: dict, model: Any, optimizer: Any, scheduler: Any, sampler: Any,
         hooks: list, objective: Any, sequence_parallel: Any = None,
         on_started: Optional[Callable[[], None]] = None) -> dict[str, Any]:
    import deepspeed

    from effitrain.console import say
    from effitrain.engine.events import EventBus
    from effitrain.engine.guard import NonFiniteGuard
    from effitrain.engine.loop import Trainer
    from effitrain.engine.rundir import resolve_resume, truncate_metrics, write_run_record
    from effitrain.engine.state import State
    from effitrain.loggers.sinks import Sinks
    from effitrain.engine.metrics import sparse_flops_per_token
    from effitrain.memory import memory_report
    from effitrain.optim.schedules import follow_this_horizon

    resuming = spec.resume is not None
    if launch.is_main:
        write_run_record(run_dir, cfg=cfg, argv=argv or sys.argv, world_size=launch.world_size, resuming=resuming,
                         recipes=[dataclasses.asdict(r) for r in spec.recipes])
        if not (run_dir / "tokenizer").is_dir():  # what `effitrain export` of any checkpoint needs besides weights
            data.tokenizer.save_pretrained(str(run_dir / "tokenizer"))
    guard = NonFiniteGuard(spec.train.max_bad_steps)
    guard.install(optimizer)
    resume_from = resolve_resume(run_dir, spec.resume) if launch.is_main else None
    if launch.world_size > 1:  # rank 0 verified the checkpoints; every rank loads the one it chose
        import torch.distributed as dist
        chosen = [resume_from]
        dist.broadcast_object_list(chosen, src=0)
        resume_from = chosen[0]
    engine_dir = None
    if resume_from is not None:  # saved by another number of processes: DeepSpeed loads a universal conversion
        from effitrain.engine.elastic import engine_checkpoint_for

        engine_dir = engine_checkpoint_for(resume_from, world_size=launch.world_size, is_main=launch.is_main,
                                           zero_stage=spec.block("parallelism").params.stage, barrier=launch.barrier,
                                           report=say)
        if engine_dir is not None:
            ds_config["checkpoint"] = {"load_universal": True}
    say("starting the DeepSpeed engine ...")
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config, dist_init_required=False,
                                           mpu=sequence_parallel.mpu if sequence_parallel is not None else None)
    if hasattr(optimizer, "attach_engine"):  # an optimizer that adapts the engine (per-layer updates)
        optimizer.attach_engine(engine)
    state = State(spec=spec, run_dir=run_dir, rank=launch.rank, world_size=launch.world_size, model=engine.module,
                  engine=engine, optimizer=optimizer, scheduler=scheduler, sampler=sampler,
                  timeline=_resolve_timeline(spec, launch, data), sequence_parallel=sequence_parallel)
    final_dir = run_dir / "final_model"
    # a curriculum that re-packs the documents (MeCo, in-context chains) hands the loop its own rows to gather from
    train_rows = getattr(sampler, "train_rows", None)
    if train_rows is None:
        train_rows = data.train_ids
    trainer = Trainer(state=state, bus=EventBus(hooks), packed_train=train_rows, eval_sets=data.eval_sets,
                      sinks=Sinks([]), guard=guard, seq_len=data.train_ids.shape[-1], objective=objective,
                      save_final_model=_final_model_writer(spec, launch, engine, data.tokenizer, final_dir),
                      on_started=_chained(lock.commit_replacement, on_started))

    if resume_from is not None:
        declared = follow_this_horizon(scheduler)
        trainer.load_checkpoint(resume_from, engine_dir)
        horizon = declared(state.step)
        if launch.is_main:
            truncate_metrics(run_dir / "metrics.jsonl", state.step)
            say(f"resumed from {resume_from} at step {state.step}")
            if horizon:
                say(f"resume: {horizon}")
    elif spec.resume == "auto" and launch.is_main:
        say(f"resume=auto: no intact checkpoint in {run_dir}, starting from step 0")
    if launch.is_main:
        trainer.sinks = Sinks(spec.block("logger").build(run_dir=run_dir, max_steps=spec.train.max_steps,
                                                         start_step=state.step, config=dict(cfg)))

    if state.step >= spec.train.max_steps:  # resume=auto of a finished run: report, train nothing
        lock.commit_replacement()
        trainer.sinks.close()
        state.eval_metrics = trainer.evaluate()
        outcome = {"finished": True, "stopped_by": None, "train_seconds": trainer.train_seconds}
    else:
        outcome = trainer.fit()

    extra_flops = sum(float(h.extra_flops(state)) for h in [*hooks, objective] if hasattr(h, "extra_flops"))
    summary = {
        "final_eval_loss": state.eval_metrics.get("eval_loss"),
        "eval_losses": {k.split("/", 1)[1]: v for k, v in state.eval_metrics.items() if k.startswith("eval_loss/")},
        # sub-models of a layerwise objective: depth -> eval loss (Sorted LLaMA / SortedNet)
        **({"eval_losses_depth": {k.split("/", 1)[1]: v for k, v in state.eval_metrics.items()
                                  if k.startswith("eval_loss_depth/")}}
           if any(k.startswith("eval_loss_depth/") for k in state.eval_metrics) else {}),
        "steps": state.step,
        "tokens": state.tokens,
        # training FLOPs, all ranks: 6N + attention per token, plus what a method ran beyond the model's counted
        # parameters (a hook's extra_flops, e.g. structured_ffn's dense guide while it is mixed in)
        "flops": trainer.flops_per_token * state.tokens + extra_flops,
        # the part of flops that methods or the objective reported beyond 6N (0 for most runs; negative when a
        # method skips counted parameters, e.g. SortedNet's sampled sub-models)
        "flops_methods": extra_flops,
        # the same, counting masked weights as skipped (static sparsity; equal to flops for a dense model)
        "flops_sparse": sparse_flops_per_token(engine.module, int(data.train_ids.shape[-1])) * state.tokens
        + extra_flops,
        "tokens_per_s": state.tokens / outcome["train_seconds"] if outcome["train_seconds"] else 0.0,
        "train_seconds": outcome["train_seconds"],
        "data_seconds": data.seconds,
        **_with_training_state(_largest_state(memory_report(engine.module, optimizer),
                                              trainer.optimizer_state_bytes_at_step), trainer.gradient_bytes_at_step),
        # gradient_bytes above is read at the end, after DeepSpeed freed them (0); this is what they took in a step
        "gradient_bytes_at_step": trainer.gradient_bytes_at_step,
        "recipe": [r.name for r in spec.recipes],
        "world_size": launch.world_size,
        "zero_stage": spec.block("parallelism").params.stage,
        # DeepSpeed-Ulysses: processes per sequence, and the tokens of a row each of them last ran its layers on
        **({"sequence_parallel": {"size": sequence_parallel.size, "slice_tokens": sequence_parallel.slice_tokens}}
           if sequence_parallel is not None else {}),
        "precision": precision.mode,
        "device": launch.device_type,
        "global_batch_size": ds_config["train_batch_size"],
        "seq_len": int(data.train_ids.shape[-1]),
        # how often the run went through its training rows: tokens trained / tokens in the rows the loop gathers
        # from (a curriculum that re-packs the documents -- MeCo, in-context chains -- has its own)
        "train_sequences": int(len(train_rows)),
        "data_passes": state.tokens / max(1, int(len(train_rows)) * int(data.train_ids.shape[-1])),
        "skipped_steps": guard.total_skipped,
        "finished": outcome["finished"],
        "stopped_by": outcome["stopped_by"],
        "stopped_by_signal": outcome.get("signal_name"),  # SIGUSR2 = submitit's requeue warning (cluster/job.py)
        "exit_code": exit_code_for(outcome),
        "selection": data.selection.info,
        "selection_manifest": str(data.selection.manifest_path) if data.selection.manifest_path else None,
        "final_model": str(final_dir) if outcome["finished"] and spec.train.save_final_model else None,
    }
    evaluate = spec.block("eval").build()
    if evaluate is not None and outcome["finished"] and launch.is_main:
        from effitrain.evaluation import format_results

        say(f"evaluating {final_dir} with lm-evaluation-harness ...")
        summary["tasks"] = evaluate(final_dir, device=launch.device_type)
        say(f"tasks: {format_results(summary['tasks'])}")
    if launch.is_main:
        _write_summary(run_dir, summary)
        if outcome["finished"]:
            say(finished_line(summary, run_dir))
        if outcome.get("signal"):
            # the outermost run: a pipeline resumes as a whole (it finds the stage that was running), never from
            # one stage's folder
            say(f"stopped ({outcome['stopped_by']}) at step {state.step}; checkpoint saved, "
                f"continue with: effitrain resume {_NESTED[0] if _NESTED else run_dir}")
        elif not outcome["finished"]:
            say(f"stopped at step {state.step}: {outcome['stopped_by']}; the run did not finish (see "
                f"{run_dir / 'summary.json'})", err=True)
    launch.barrier()
    return summary


def finished_line(summary: dict[str, Any], run_dir: Path) -> str:
    """The run in one line at its end, and where its curves are."""
    loss = summary.get("final_eval_loss")
    seconds = float(summary.get("train_seconds") or 0.0)
    took = f"{seconds:.1f} s" if seconds < 60 else f"{int(seconds // 60)} min {seconds % 60:02.0f} s"
    return (f"finished: {summary['steps']:,} step{'s' if summary['steps'] != 1 else ''}, {summary['tokens']:,} tokens in {took} "
            f"({summary.get('tokens_per_s', 0):,.0f} tokens/s)"
            + (f", eval loss {loss:.4f}" if loss is not None else "")
            + (f", {_passes(summary['data_passes'])} over the {summary['train_sequences']:,} training sequences"
               if summary.get("train_sequences") else "")
            + f"; curves and table: effitrain report {run_dir}")


def _passes(passes: float) -> str:
    return f"{passes:.2f} passes" if passes >= 0.1 else f"{passes:.2g} of a pass"


def exit_code_for(outcome: dict[str, Any]) -> int:
    """The process's exit status for a run's outcome (docs/reliability.md): 0 finished, 75 stopped by a signal
    with a checkpoint to resume from, 3 stopped by the non-finite guard."""
    from effitrain.errors import EXIT_DIVERGED, EXIT_OK, EXIT_RESUMABLE

    if outcome["finished"]:
        return EXIT_OK
    return EXIT_RESUMABLE if outcome.get("signal") else EXIT_DIVERGED
