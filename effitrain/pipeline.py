"""Run a config: :func:`run` sends a multi-stage recipe to :func:`run_pipeline`, a thin loop over
:func:`effitrain.train.train` (one complete run per stage), and any other config to ``train`` itself.  The
pipeline calls ``train``, never the other way round.

Layout of a pipeline's run directory::

    RUN_DIR/
      config.yaml, recipes.yaml, command.txt   the pipeline's own record (``effitrain resume RUN_DIR`` reloads it)
      summary.json                             one row per stage, and the totals (tokens, time, FLOPs)
      stages/01-small/                         a complete run directory per stage (config, metrics, checkpoints,
      stages/02-stacked/                       final_model, summary)
      handoff/02-stacked/                      the transformed model a stage starts from, when it has a transform

A stage with ``sweep:`` trains member runs instead of one (``stages/01-proxies/members/proxy-000/`` ..., each a
complete run directory, one after another), then its sweep block concludes a config delta, written (atomically)
as ``stages/01-proxies/concluded.yaml``; a later stage with ``config_from: proxies`` merges it.  A finished member
is not re-run on resume.

What holds between stages: a stage with ``init: previous`` starts from the previous stage's ``final_model``
(through its ``transform`` if it has one); a stage with ``data: continue`` trains on the batches after the previous
stage's last one (its sampler starts from that stage's final checkpoint, ``train.continue_data_from``); a stage
that finished is never re-run; ``resume=auto`` resumes the stage that was running from its newest verified
checkpoint.  The stages themselves are ordinary runs: the engine does not
know it is inside a pipeline.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

from effitrain.config.resume import finished_summary
from effitrain.config.spec import validate
from effitrain.config.stages import DATA_CONTINUE, HANDOFF_DIR, STAGES_DIR, StageDecl, resolve_refs, stage_config
from effitrain.generation.synthesis import product_path, run_synthesis
from effitrain.registry import ConfigError
# _write_summary: the runs' own atomic summary writer, for the pipeline's summary too
from effitrain.train import _write_summary, in_progress, train

TRANSFORM_RECORD = "effitrain_transform.json"


def stage_dirs(run_dir: Path, stages: list[StageDecl]) -> dict[str, Path]:
    return {s.name: run_dir / STAGES_DIR / s.dir_name for s in stages}


def run(cfg: dict[str, Any], *, run_dir: Optional[Path] = None, argv: Optional[list[str]] = None,
        recipes: Optional[list[dict]] = None, on_started: Optional[Callable[[], None]] = None) -> dict[str, Any]:
    """Train from a resolved config mapping (what the CLI calls); returns the summary.  A config with ``stages:``
    trains every stage in order under ``run_dir/stages/``; any other is one run (:func:`effitrain.train.train`)."""
    if cfg.get("stages") is None:  # as validate() decides between one run and stages
        return train(cfg, run_dir=run_dir, argv=argv, recipes=recipes, on_started=on_started)
    spec = validate(cfg, recipes)
    run_dir = Path(run_dir or spec.run_dir or "outputs/run")
    with in_progress(run_dir):
        return run_pipeline(dict(cfg), spec, run_dir, argv, recipes)


def run_pipeline(cfg: dict[str, Any], spec: Any, run_dir: Path, argv: Optional[list[str]],
                 recipes: Optional[list[dict]]) -> dict[str, Any]:
    """Train every stage of ``spec.stages`` in order; returns (and writes) the pipeline summary."""
    import dataclasses
    import sys

    from effitrain.config.resume import check_resume_config, nothing_to_resume
    from effitrain.console import attach_log, say
    from effitrain.engine.rundir import RunDirLock, check_run_dir, write_run_record
    from effitrain.parallel.dist import dist_env

    if spec.resume not in (None, "auto"):
        raise ConfigError(f"resume: a multi-stage run resumes with resume=auto (it finds the stage that was running), "
                          f"not from one checkpoint ({spec.resume})")
    check_run_dir(run_dir, resume=spec.resume, overwrite=spec.overwrite)
    check_resume_config(run_dir, cfg, spec.resume, recipes if recipes is not None else spec.recipes)
    finished = nothing_to_resume(run_dir, spec) if spec.resume == "auto" else None
    if finished is not None:  # before the lock and the run record: a finished pipeline is left as it is
        say(finished.line)
        return finished.summary
    env = dist_env()
    is_main = env.rank == 0
    lock = RunDirLock(run_dir)
    if is_main:
        lock.acquire(resume=spec.resume, overwrite=spec.overwrite)
    attach_log(run_dir, env.rank)
    recipe_rows = recipes if recipes is not None else [dataclasses.asdict(r) for r in spec.recipes]
    summary: dict[str, Any] = {"finished": False, "stopped_by": "failed before the first stage started",
                               "stages": []}
    try:
        if is_main:
            write_run_record(run_dir, cfg=cfg, argv=argv or sys.argv, world_size=env.world_size,
                             resuming=spec.resume is not None, recipes=recipe_rows)
        summary = _run_stages(cfg, spec, run_dir, argv, recipes, is_main, lock, say)
    except BaseException as exc:
        summary = {**summary, "finished": False, "failed": f"{type(exc).__name__}: {exc}".strip()}
        if is_main:
            if lock.replacing:
                lock.abandon_replacement()
            elif run_dir.is_dir():
                _write_summary(run_dir, summary)
        raise
    finally:
        lock.release()
    return summary


def _run_stages(cfg: dict[str, Any], spec: Any, run_dir: Path, argv: Optional[list[str]],
                recipes: Optional[list[dict]], is_main: bool, lock: Any, say: Any) -> dict[str, Any]:
    stages: list[StageDecl] = spec.stages
    # absolute: the stages' configs record the models they start from (model.path), and `effitrain resume
    # outputs/r2` must find the same paths the first launch (which Hydra gave an absolute folder) stored
    run_dir = run_dir.absolute()
    dirs = stage_dirs(run_dir, stages)
    # what '@stage:NAME' names: a stage's final model, or the dataset a synthesis stage made
    final_models = {s.name: str(product_path(dirs[s.name]) if s.synthesis is not None else dirs[s.name] / "final_model")
                    for s in stages}
    concluded: dict[str, dict] = {}  # sweep stage -> the config delta it concluded
    rows: list[dict[str, Any]] = []
    outcome: dict[str, Any] = {}
    ran_here: list[str] = []  # stages this launch trained: after them a refusal no longer leaves things unchanged
    stage = stages[0]
    try:
        for i, stage in enumerate(stages):
            stage_dir = dirs[stage.name]
            label = f"stage {stage.index}/{len(stages)} '{stage.name}'"
            done = finished_summary(stage_dir)
            if done is not None:
                say(f"{label}: finished before, not re-run ({stage_dir})")
                if stage.sweep is not None:
                    concluded[stage.name] = _read_concluded(stage_dir)
                rows.append(_row(stage, stage_dir, done, transform=_read_transform(run_dir, stage), skipped=True))
                lock.commit_replacement()
                continue
            if stage.synthesis is not None:  # a stage whose product is a dataset: no run, no model
                run_cfg = stage_config(cfg, stage, init_model=None, final_models=final_models, concluded=concluded)
                stage_summary = run_synthesis(stage, run_cfg, stage_dir, final_models=final_models, say=say,
                                              label=label, is_main=is_main)
                lock.commit_replacement()
                ran_here.append(stage.name)
                rows.append(_row(stage, stage_dir, stage_summary, transform=None, skipped=False))
                if not stage_summary.get("finished"):  # stopped by a signal: exit 75, resume=auto continues it
                    outcome = {"stopped_by": f"stage '{stage.name}': {stage_summary.get('stopped_by')}",
                               "exit_code": stage_summary.get("exit_code", 1),
                               "stopped_by_signal": stage_summary.get("stopped_by_signal")}
                    break
                continue
            init_model, transform_info = None, None
            if stage.inherits_model:
                source = Path(final_models[stages[i - 1].name]) if stage.init == "previous" else \
                    Path(resolve_refs(stage.init, final_models))  # a folder, or '@stage:NAME': that stage's model
                init_model, transform_info = _handoff(source, stage, run_dir, is_main, say, final_models)
            run_cfg = stage_config(cfg, stage, init_model=str(init_model) if init_model else None,
                                   final_models=final_models, concluded=concluded)
            if stage.sweep is not None:
                stage_summary, delta = _run_sweep(stage, run_cfg, stage_dir, spec.resume == "auto", argv, recipes,
                                                  is_main, say, label, on_started=lock.commit_replacement)
                lock.commit_replacement()
                ran_here.append(stage.name)
                rows.append(_row(stage, stage_dir, stage_summary, transform=None, skipped=False))
                if not stage_summary.get("finished"):
                    outcome = {"stopped_by": f"stage '{stage.name}': {stage_summary.get('stopped_by')}",
                               "exit_code": stage_summary.get("exit_code", 1)}
                    break
                concluded[stage.name] = delta  # every rank concluded the same from the same losses: no file read race
                continue
            resuming = spec.resume == "auto" and (stage_dir / "config.yaml").is_file()
            run_cfg.update(run_dir=str(stage_dir), resume="auto" if resuming else None, overwrite=False)
            if stage.data == DATA_CONTINUE:  # the sampler starts where the previous stage's last checkpoint left it
                run_cfg.setdefault("train", {})["continue_data_from"] = str(dirs[stages[i - 1].name])
            say(f"{label}: {'resuming' if resuming else 'starting'} in {stage_dir}")
            # the pipeline it replaces goes at the new pipeline's first optimizer step, as a single run's does
            stage_summary = train(run_cfg, run_dir=stage_dir, argv=argv, recipes=recipes,
                                  on_started=lock.commit_replacement)
            lock.commit_replacement()  # a stage has run: the pipeline it replaced is not coming back
            ran_here.append(stage.name)
            rows.append(_row(stage, stage_dir, stage_summary, transform=transform_info, skipped=False))
            if not stage_summary.get("finished"):
                outcome = {"stopped_by": f"stage '{stage.name}': {stage_summary.get('stopped_by')}",
                           "exit_code": stage_summary.get("exit_code", 1),
                           "stopped_by_signal": stage_summary.get("stopped_by_signal")}
                break
    except ConfigError as exc:
        if not ran_here:
            raise  # nothing was trained or changed: an ordinary refusal
        from effitrain.errors import RunFailed

        raise RunFailed(f"stages.{stage.name}: refused after stage(s) {', '.join(ran_here)} trained (kept in "
                        f"{run_dir / STAGES_DIR}): {exc}") from None
    finished = len(rows) == len(stages) and all(r["finished"] for r in rows)
    last = rows[-1] if rows else {}
    summary = {
        "stages": rows,
        "totals": {key: sum(r.get(key) or 0 for r in rows)
                   for key in ("steps", "tokens", "train_seconds", "flops", "flops_sparse")},
        "finished": finished,
        "stopped_by": outcome.get("stopped_by"),
        "exit_code": 0 if finished else outcome.get("exit_code", 1),
        "stopped_by_signal": outcome.get("stopped_by_signal"),  # a cluster job hands a SIGUSR2 stop to submitit
        "final_eval_loss": last.get("final_eval_loss"),
        "final_model": last.get("final_model") if finished else None,
        "recipe": [r.name for r in spec.recipes],
    }
    summary["steps"], summary["tokens"] = summary["totals"]["steps"], summary["totals"]["tokens"]
    if is_main:
        _write_summary(run_dir, summary)
        if finished:
            say(f"pipeline finished: {len(rows)} stages, {summary['tokens']} tokens, final model {last.get('final_model')}")
    return summary


CONCLUDED = "concluded.yaml"
MEMBERS_DIR = "members"


def _read_concluded(stage_dir: Path) -> dict:
    import yaml

    return (yaml.safe_load((stage_dir / CONCLUDED).read_text()) or {}).get("config") or {}


def _run_sweep(stage: StageDecl, run_cfg: dict[str, Any], stage_dir: Path, resuming: bool,
               argv: Optional[list[str]], recipes: Optional[list[dict]], is_main: bool, say: Any,
               label: str, on_started: Any = None) -> tuple[dict[str, Any], Optional[dict]]:
    """Train every member of a sweep stage (each a whole run under ``members/``), then conclude: the config delta
    goes to ``concluded.yaml`` with the sweep's record, and ``summary.json`` marks the stage finished."""
    import os

    import yaml

    from effitrain.config.spec import parse_sweep
    sweep = parse_sweep(stage).build()
    members = sweep.members(run_cfg, say=say)
    say(f"{label}: sweep of {len(members)} member runs in {stage_dir / MEMBERS_DIR}")
    results = []
    for k, (name, member_cfg) in enumerate(members):
        member_dir = stage_dir / MEMBERS_DIR / name
        done = finished_summary(member_dir)
        if done is None:
            resume = resuming and (member_dir / "config.yaml").is_file()
            member_cfg = {**member_cfg, "run_dir": str(member_dir), "resume": "auto" if resume else None,
                          "overwrite": False}
            say(f"{label}: member {k + 1}/{len(members)} {name}")
            done = train(member_cfg, run_dir=member_dir, argv=argv, recipes=recipes, on_started=on_started)
            if not done.get("finished"):
                return {**done, "stopped_by": f"member {name}: {done.get('stopped_by')}"}, None
        results.append((name, member_cfg, done))
    delta, record = sweep.conclude(run_cfg, results, say=say)
    summary = {"finished": True, "stopped_by": None, "exit_code": 0, "sweep": stage.sweep.get("name"),
               "members": len(results),
               "steps": max(int(r[2].get("steps") or 0) for r in results),
               "tokens": sum(int(r[2].get("tokens") or 0) for r in results),
               "train_seconds": sum(float(r[2].get("train_seconds") or 0) for r in results),
               "flops": sum(float(r[2].get("flops") or 0) for r in results),
               "flops_sparse": sum(float(r[2].get("flops_sparse") or 0) for r in results),
               # the members' model (they share its shape); no final model, no eval loss of the stage itself
               "trainable_params": results[0][2].get("trainable_params"),
               "total_params": results[0][2].get("total_params"),
               "concluded": str(stage_dir / CONCLUDED)}
    if is_main:
        text = (f"# Concluded by the '{stage.name}' sweep stage ({stage.sweep.get('name')}); later stages with "
                f"config_from: {stage.name} merge `config`.\n" + yaml.safe_dump({"config": delta, "record": record},
                                                                                 sort_keys=False))
        tmp = stage_dir / (CONCLUDED + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(stage_dir / CONCLUDED)
        _write_summary(stage_dir, summary)
    return summary, delta


def _row(stage: StageDecl, stage_dir: Path, summary: dict[str, Any], *, transform: Optional[dict],
         skipped: bool) -> dict[str, Any]:
    keys = ("finished", "exit_code", "steps", "tokens", "train_seconds", "flops", "flops_sparse", "final_eval_loss",
            "final_model", "trainable_params", "total_params", "stopped_by",
            "dataset")  # a synthesis stage's product (None for the stages that train)
    return {"stage": stage.name, "run_dir": str(stage_dir), "init": stage.init, "transform": transform,
            "skipped_as_finished": skipped, **{k: summary.get(k) for k in keys}}


def _handoff(source: Path, stage: StageDecl, run_dir: Path, is_main: bool, say: Any,
             final_models: Optional[dict[str, str]] = None) -> tuple[Path, Optional[dict]]:
    """The folder the stage starts from: ``source`` itself, or ``source`` through the stage's transform (written once,
    atomically, by rank 0; a resumed pipeline reuses it)."""
    if not (source / "config.json").is_file():
        raise ConfigError(f"stages.{stage.name}.init: {source} holds no model (no config.json); the stage it comes "
                          f"from must finish with train.save_final_model=true")
    if stage.transform is None:
        export = source / "effitrain_export.json"
        info = json.loads(export.read_text()) if export.is_file() else {}
        if info.get("adapter") and not info.get("merged"):
            raise ConfigError(f"stages.{stage.name}.init: {source} is the frozen base of a prompt-learning adapter "
                              f"that cannot be merged; a stage cannot continue from it")
        return source, None
    out = run_dir / HANDOFF_DIR / stage.dir_name
    record = out / TRANSFORM_RECORD
    if is_main and not record.is_file():
        from effitrain.config.spec import parse_transform

        from effitrain.config.stages import resolve_refs

        # '@stage:NAME' in a transform's parameters: that earlier stage's final model
        transform = parse_transform(dataclasses.replace(stage, transform=resolve_refs(stage.transform,
                                                                                      final_models or {})))
        say(f"stage '{stage.name}': applying transform {transform.name} to {source} ...")
        model, info = transform.build(source)
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(str(tmp))
        _copy_tokenizer(source, tmp)
        # inside the folder that becomes visible only by the rename below: a plain write is atomic enough
        (tmp / TRANSFORM_RECORD).write_text(json.dumps({"transform": transform.name, "source": str(source),
                                                        "info": info}, indent=1, default=str))
        shutil.rmtree(out, ignore_errors=True)  # an incomplete earlier attempt (no record): never a finished one
        tmp.rename(out)
    deadline = time.monotonic() + 3600
    while not record.is_file():  # the other ranks wait for rank 0's folder (the process group may not exist yet)
        if time.monotonic() > deadline:
            raise RuntimeError(f"waited an hour for rank 0 to write {out}")
        time.sleep(0.5)
    return out, json.loads(record.read_text())


def _read_transform(run_dir: Path, stage: StageDecl) -> Optional[dict]:
    record = run_dir / HANDOFF_DIR / stage.dir_name / TRANSFORM_RECORD
    return json.loads(record.read_text()) if record.is_file() else None


def _copy_tokenizer(source: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(str(source)).save_pretrained(str(out))
    except (OSError, ValueError):  # a model saved without its tokenizer: the stage config must name one
        pass
