"""The `effitrain` command: tool verbs, or a Hydra training run (single or `-m` sweep).

    effitrain [OVERRIDES]                 train (the default job: a tiny Llama on the built-in corpus)
    effitrain +recipe=NAME [OVERRIDES]    train with a paper's method; '+recipe=[a,b]' stacks two
    effitrain -m +recipe=a,b KEY=v1,v2    sweep with Hydra's launcher (hydra/launcher=...)
    effitrain recipes                     list the recipes: name, paper, blocks touched
    effitrain show NAME [OVERRIDES]       print the resolved config of a recipe ('default' = no recipe)
    effitrain check [OVERRIDES]           validate only (keys, types, ranges, compatibility rules)
    effitrain check --memory [--device-gib N] [--world-size N] [OVERRIDES]
                                          also estimate per-device memory and say whether it fits (exit 1: no)
    effitrain diff A B [OVERRIDES]        the keys in which two sides' configs differ (recipes, stacks, quoted
                                          override lists, or run directories: the values their config.yaml holds)
    effitrain explain KEY [OVERRIDES]     one key's value and every layer that set it, in Hydra's order
    effitrain rules                       the compatibility rules as a table
    effitrain plan [OVERRIDES] [--plot F.png] [--law FILE]  the run's timeline: lr, seq_len, mixture, phases at
                                               each breakpoint (--law: a fitted anneal_law's predicted loss)
    effitrain select [OVERRIDES]          run the data-selection stage alone and write its manifest
    effitrain prepare [OVERRIDES]         build the run's data (selection, tokenizer, packed rows or token shards)
                                          and stop; the training run with the same overrides starts from the cache
    effitrain export CKPT|RUN_DIR [--out DIR] [--merge-adapters]
                                          a Hugging Face folder from any checkpoint (ZeRO-3 gathered); a run dir:
                                          its newest checkpoint (a multi-stage run: its last stage's)
    effitrain evaluate PATH [eval.KEY=V]  lm-evaluation-harness tasks on a model folder, checkpoint or run dir
    effitrain report RUN_DIR...|SWEEP_DIR [--out DIR] [--title T]
                                          curves and final figures as report.html (self-contained) + report.md
    effitrain lock [--check] [NAME...]    rewrite (or check) recipes/locked/, the cards' generated blocks,
                                          docs/compatibility.md and docs/reproductions.md (from docs/results/)
    effitrain resume RUN_DIR [KEY=VALUE]  continue a run with its own config and recipes (only e.g. train.max_steps,
                                          eval/save/log cadence and logger.* may change)

    effitrain --verbose [OVERRIDES]       train, showing third-party output (otherwise in RUN_DIR/third_party.log)
    effitrain --version                   print effitrain's version

Every configuration error is one line on stderr and exit status 2, before any model, data or run directory is made.
Exit status: 0 finished, 1 failed, 2 refused (bad input), 3 diverged (non-finite guard), 75 stopped by a signal
with a checkpoint (continue with resume=auto), 130 interrupted without saving (docs/reliability.md).
The configuration verbs (recipes, show, check, diff, explain, rules, plan, lock) import neither torch nor deepspeed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from effitrain.errors import (EXIT_BROKEN_PIPE, EXIT_CONFIG, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK,
                              EXIT_RESUMABLE, JOB_EXITS, REPORT_BUGS, RunFailed)
from effitrain.registry import ConfigError

if TYPE_CHECKING:  # the tool verbs import the config modules lazily
    from effitrain.config.resume import Finished

# Exit statuses of the jobs of this invocation (one for a run, one per member of a sweep), and the run directories
# that did not exist before the pre-flight (an empty one that Hydra made for a refused job is removed again).
_JOB_EXITS: list[int] = JOB_EXITS  # shared with the SLURM launcher, which learns the exits of remote members
_NEW_DIRS: set[str] = set()
_LAST_SUMMARY: dict = {}          # the summary of the job that ran last in this process
_LAST_ERROR: list[str] = []       # its one-line error, if it printed one
_SWEEP_ENTRIES: dict[int, dict] = {}  # sweep.json's members of an in-process sweep
_HYDRA_FLAGS_WITH_VALUE = {"--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd",
                           "--experimental-rerun"}


def _split_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate Hydra's flags (``-m``, ``--cfg job``, ...) from the overrides."""
    flags, overrides = [], []
    it = iter(argv)
    for arg in it:
        if arg.startswith("-") and not arg.startswith("~"):
            flags.append(arg)
            if arg in _HYDRA_FLAGS_WITH_VALUE or arg in ("--cfg", "-c", "--package", "-p", "--info", "-i"):
                nxt = next(it, None)
                if nxt is not None:
                    flags.append(nxt)
        else:
            overrides.append(arg)
    return flags, overrides


# ---------------------------------------------------------------------------------------------- verbs
def _verb_recipes(args: list[str]) -> int:
    from effitrain.config.compose import recipe_table_rows

    rows = recipe_table_rows()  # a recipe file that cannot be read is listed with its error, not fatal
    widths = [max(len(r[i]) for r in rows + [("recipe", "paper", "blocks")]) for i in range(3)]
    print(f"{'recipe'.ljust(widths[0])}  {'paper'.ljust(widths[1])}  blocks")
    for row in rows:
        print(f"{row[0].ljust(widths[0])}  {row[1].ljust(widths[1])}  {row[2]}")
    return 0


def _recipe_overrides(name: str) -> list[str]:
    return [] if name in ("default", "train") else [f"+recipe={name}"]


def _verb_show(args: list[str]) -> int:
    import yaml

    from effitrain.config.compose import compose_config
    from effitrain.config.spec import validate

    if not args:
        raise ConfigError("show: name a recipe (effitrain recipes lists them), or 'default'")
    composed = compose_config(_recipe_overrides(args[0]) + args[1:])
    validate(composed.cfg, composed.recipes)
    print(yaml.safe_dump(composed.cfg, sort_keys=False), end="")
    return 0


def _verb_check(args: list[str]) -> int:
    if "--memory" in args:
        return _check_memory(args)
    resumed = _remembered_resume(args) if args[:1] != ["resume"] else args[1:]
    if resumed is not None:
        *_, finished = _prepare_resume(resumed, deep=True)
        print(f"ok: {finished.line}" if finished else f"ok: resuming {resumed[0]} with its stored config and recipes")
        return 0
    from effitrain.config.inputs import what_was_read

    what_was_read()
    spec, _ = preflight(args, multirun=False, check_dir=True, deep=True)  # deep: reads local data files through
    names = ", ".join(r.name for r in spec.recipes) or "none"
    blocks = ", ".join(f"{g}={b.name}" for g, b in spec.blocks.items())
    stages = f"; stages [{', '.join(s.name for s in spec.stages)}]" if spec.stages else ""
    print(f"ok: recipes [{names}]; {blocks}; methods [{', '.join(spec.methods) or 'none'}]{stages}")
    for note in what_was_read():
        print(f"  read {note}")
    return 0


def _verb_plan(args: list[str]) -> int:
    from effitrain.config.compose import compose_config
    from effitrain.plan import (add_law_predictions, check_plot_path, format_section, load_law, plan_sections,
                                plot_sections)

    law = None
    if "--law" in args:  # a fitted annealing law: the plan also predicts the loss of the configured schedule
        i = args.index("--law")
        if i + 1 >= len(args) or args[i + 1].startswith("-") or "=" in args[i + 1]:
            raise ConfigError("plan: --law needs a file, e.g. --law outputs/run/stages/01-fit/concluded.yaml")
        law, args = load_law(args[i + 1]), args[:i] + args[i + 2:]
    plot_to = None
    if "--plot" in args:
        i = args.index("--plot")
        if i + 1 >= len(args) or not args[i + 1].lower().endswith(".png"):
            raise ConfigError("plan: --plot needs a file name ending in .png, e.g. --plot plan.png")
        plot_to, args = check_plot_path(args[i + 1]), args[:i] + args[i + 2:]
    composed = compose_config(args)
    sections = plan_sections(composed.cfg, composed.recipes)
    if law is not None:
        add_law_predictions(sections, law)
    print("\n\n".join(format_section(section) for section in sections))
    if plot_to:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ConfigError("plan: --plot needs matplotlib (pip install 'effitrain[plot]')") from None
        print(f"wrote {plot_sections(sections, plot_to)}")
    return 0


def _check_memory(args: list[str]) -> int:
    """``check --memory [--device-gib N] [--world-size N] [OVERRIDES]``: validate, then plan per-device memory."""
    from effitrain.planner.memory import format_plan, plan, setup_from_spec

    options = {"--device-gib": 80.0, "--world-size": None}
    overrides, it = [], iter(a for a in args if a != "--memory")
    for arg in it:
        flag, eq, value = arg.partition("=")
        if flag in options:
            value = value if eq else next(it, "")
            try:
                options[flag] = float(value) if flag == "--device-gib" else int(value)
            except ValueError:
                raise ConfigError(f"check {flag}: expected a {'number of GiB' if flag == '--device-gib' else 'whole number'}, "
                                  f"got {value!r}") from None
            if options[flag] <= 0:
                raise ConfigError(f"check {flag}: must be positive, got {value}")
        elif arg.startswith("--"):
            raise ConfigError(f"check: unknown flag {arg}; check --memory takes --device-gib N and --world-size N")
        else:
            overrides.append(arg)
    world = options["--world-size"] or _world_size()
    spec, _ = preflight(overrides, multirun=False, check_dir=False, world=world)
    result = plan(setup_from_spec(spec, world=world))
    print(format_plan(result, options["--device-gib"]))
    return 0 if result.device_bytes <= options["--device-gib"] * 2 ** 30 else EXIT_FAILED


def _verb_diff(args: list[str]) -> int:
    from effitrain.config.provenance import diff, format_diff

    fmt, rest = "text", []
    words = list(args)
    while words:
        word = words.pop(0)
        if word == "--format":
            fmt = words.pop(0) if words else ""
            if fmt not in ("text", "markdown"):
                raise ConfigError(f"diff: --format: expected text or markdown, got '{fmt}'")
        elif word.startswith("--"):
            raise ConfigError(f"diff: unknown option '{word}'; options: --format text|markdown")
        else:
            rest.append(word)
    if len(rest) < 2:
        raise ConfigError("diff: name two sides -- recipes ('baseline wsd'), stacks ('galore+lisa'), quoted override "
                          "lists ('optimizer=galore optimizer.lr=1e-3') or run directories -- then overrides for both")
    rows, a, b = diff(rest[0], rest[1], rest[2:])
    print(format_diff(rows, a, b, fmt))
    return 0


def _verb_explain(args: list[str]) -> int:
    from effitrain.config.provenance import explain

    if not args or "=" in args[0]:
        raise ConfigError("explain: name a key, then the recipe and overrides, e.g. 'effitrain explain optimizer.lr "
                          "+recipe=galore optimizer.lr=1e-3'")
    print(explain(args[0], args[1:]))
    return 0


def _verb_lock(args: list[str]) -> int:
    from effitrain.config.tree import RECIPE_GROUP, group_options, load_recipe
    from effitrain.config.lock import digest_is_current, lock_dir, stale_locks, write_digest, write_locks

    check = "--check" in args
    names = [a for a in args if a != "--check"]
    for name in names:
        if name.startswith("--"):
            raise ConfigError(f"lock: unknown option '{name}'; options: --check, or recipe names")
        load_recipe(name)
    from effitrain.config.generated import stale_generated, write_generated

    if check:
        if not names and digest_is_current():  # nothing they are computed from changed since `effitrain lock`
            print(f"{len(group_options(RECIPE_GROUP))} lock file(s), their cards' generated blocks, "
                  f"docs/compatibility.md and docs/reproductions.md current (inputs unchanged since the last "
                  f"'effitrain lock')")
            return 0
        problems = stale_locks(names or None)
        stale_docs = stale_generated(names or None)
        if problems or stale_docs:
            listed = ", ".join([*(f"{n} ({why})" for n, why in sorted(problems.items())),
                                *(str(p) for p in stale_docs)])
            print(f"effitrain: generated files not current: {listed}; run 'effitrain lock' and commit them",
                  file=sys.stderr)
            return EXIT_FAILED
        print(f"{len(names or group_options(RECIPE_GROUP))} lock file(s), their cards' generated blocks"
              f"{'' if names else ', docs/compatibility.md and docs/reproductions.md'} current")
        return 0
    changed = write_locks(names or None)
    docs = write_generated(names or None)
    if not names:
        write_digest()
    print(f"rewrote {len(changed)} lock file(s) in {lock_dir()}" + (f": {', '.join(changed)}" if changed else "")
          + f"; {len(docs)} generated doc(s)" + (f": {', '.join(p.name for p in docs)}" if docs else ""))
    return 0


def _verb_rules(args: list[str]) -> int:
    from effitrain.config.rules import rules_table
    from effitrain.config.blocks import load_builtin_blocks

    load_builtin_blocks()
    print(rules_table())
    return 0


def _verb_select(args: list[str]) -> int:
    from effitrain.selection.stage import select_main

    return select_main(args)


def _verb_prepare(args: list[str]) -> int:
    from effitrain.prepare import prepare_main

    return prepare_main(args, lambda overrides: preflight(overrides, multirun=False, check_dir=False)[0])


def _verb_evaluate(args: list[str]) -> int:
    from effitrain.evaluation import evaluate_main

    return evaluate_main(args)


def _verb_export(args: list[str]) -> int:
    from effitrain.export import export_main

    return export_main(args)


def _verb_report(args: list[str]) -> int:
    from effitrain.report import check_out_dir, collect, default_out_dir, write_report

    paths, out, title, rest = [], None, "effitrain report", list(args)
    while rest:
        word = rest.pop(0)
        if word in ("--out", "--title"):
            if not rest:
                raise ConfigError(f"report: {word} needs a value, e.g. 'effitrain report outputs/run --out report/'")
            value = rest.pop(0)
            out, title = (Path(value), title) if word == "--out" else (out, value)
        elif word.startswith("--"):
            raise ConfigError(f"report: unknown option '{word}'; options: --out DIR, --title TEXT")
        else:
            paths.append(Path(word))
    if not paths:
        raise ConfigError("report: name run directories or a sweep root, e.g. 'effitrain report outputs/run' or "
                          "'effitrain report outputs/sweep'")
    out = out or default_out_dir(paths)
    check_out_dir(out)  # before reading: a refused --out costs nothing
    notes: list[str] = []
    runs = collect(paths, notes)
    for note in notes:  # damaged files were left out; the rest is reported
        print(f"effitrain: warning: report: {note}", file=sys.stderr)
    html_path, md_path = write_report(runs, out, title=title, notes=notes)
    print(f"report of {len(runs)} run(s): {html_path} (self-contained), {md_path}")
    return 0


def _prepare_resume(args: list[str], deep: bool = False) -> tuple[dict, Path, Optional[list], Optional[Finished]]:
    """``RUN_DIR [KEY=VALUE ...]`` -> the run's stored config with the safe overrides, validated, and whether the
    run already finished at that horizon (then nothing is to be done)."""
    from effitrain.config.inputs import check_inputs
    from effitrain.config.resume import keep_global_batch, nothing_to_resume, remembered_config
    from effitrain.config.rules import Environment, check_rules
    from effitrain.config.spec import validate
    from effitrain.engine.rundir import check_run_dir

    if not args or "=" in args[0]:
        raise ConfigError("resume: name the run directory, e.g. 'effitrain resume outputs/my-run train.max_steps=400'")
    run_dir = Path(args[0])
    check_run_dir(run_dir, resume="auto", overwrite=False)
    cfg, recipes = remembered_config(run_dir, args[1:])
    elastic = keep_global_batch(run_dir, cfg, _world_size())
    if elastic and os.environ.get("RANK", "0") == "0":
        from effitrain.console import say
        say(elastic)
    spec = validate(cfg, recipes)
    finished = nothing_to_resume(run_dir, spec)  # refuses a horizon below the run's step before any other check
    check_rules(spec, Environment(world_size=_world_size()))
    check_inputs(spec, deep=deep)
    return cfg, run_dir, recipes, finished


def _verb_resume(args: list[str]) -> int:
    cfg, run_dir, recipes, finished = _prepare_resume(args)
    if finished is not None:
        # exit 0, not 2: nothing was wrong with the request, and the run is where it was asked to get (a requeue
        # loop or a script that resumes until done stops here instead of seeing a failure)
        print(finished.line)
        return EXIT_OK
    return _train_job(cfg, run_dir, recipes, argv=["effitrain", "resume", *args])


def _remembered_resume(overrides: list[str]) -> Optional[list[str]]:
    """``run_dir=R resume=auto [KEY=VALUE ...]`` of an existing run is ``resume R [KEY=VALUE ...]``."""
    from effitrain.config.resume import remembers

    values = dict(o.split("=", 1) for o in overrides if o.startswith(("run_dir=", "resume=")))
    run_dir = values.get("run_dir")
    if values.get("resume") != "auto" or not run_dir or not (Path(run_dir) / "config.yaml").is_file():
        return None
    rest = [o for o in overrides if not o.startswith(("run_dir=", "resume="))]
    return [run_dir, *rest] if remembers(rest) else None


VERBS: dict[str, Callable[[list[str]], int]] = {
    "recipes": _verb_recipes, "show": _verb_show, "check": _verb_check, "diff": _verb_diff, "rules": _verb_rules,
    "select": _verb_select, "prepare": _verb_prepare, "resume": _verb_resume, "export": _verb_export,
    "evaluate": _verb_evaluate, "plan": _verb_plan, "report": _verb_report, "explain": _verb_explain,
    "lock": _verb_lock,
}


# ---------------------------------------------------------------------------------------------- training
def preflight(overrides: list[str], *, multirun: bool, check_dir: bool, deep: bool = False,
              world: Optional[int] = None):
    """Compose and validate (every job of a sweep); check the inputs (files, folders, credentials; ``deep``: every
    record of local data); refuse to reuse a run directory.  Builds nothing."""
    from effitrain.config.compose import compose_config, expand_sweeps
    from effitrain.config.inputs import check_inputs
    from effitrain.config.rules import Environment, check_rules
    from effitrain.config.spec import validate
    from effitrain.config.resume import check_resume_config, nothing_to_resume
    from effitrain.engine.rundir import check_run_dir

    jobs = expand_sweeps(overrides) if multirun else [overrides]
    world = world or _world_size()
    first = None
    for job in jobs:
        composed = compose_config(job)
        spec = validate(composed.cfg, composed.recipes)
        for one in [spec, *spec.stage_specs]:
            check_rules(one, Environment(world_size=world))
        for one, later, stage in _specs_with_inputs_now(spec):
            try:
                check_inputs(one, deep=deep, later=later)
                if one.synthesis is not None:  # its generator: the model folder, the key variable, the endpoint
                    one.synthesis.check_inputs("synthesis", spec=one, deep=deep)
            except ConfigError as exc:  # in a pipeline, say which stage's input it is
                raise ConfigError(f"stages.{stage}: {exc}" if stage else str(exc)) from None
        if check_dir and not multirun:
            if not (spec.run_dir or "").strip():
                raise ConfigError("run_dir: is empty; a run needs a folder of its own, e.g. run_dir=outputs/my-run")
            run_dir = Path(spec.run_dir)
            check_run_dir(run_dir, resume=spec.resume, overwrite=spec.overwrite)
            check_resume_config(run_dir, composed.cfg, spec.resume, composed.recipes)
            if spec.resume == "auto" and (run_dir / "config.yaml").is_file():
                nothing_to_resume(run_dir, spec)  # a horizon below the run's step is refused here, before Hydra
            if not run_dir.exists():
                _NEW_DIRS.add(str(run_dir.absolute()))
        first = first or (spec, composed)
    return first


def _specs_with_inputs_now(spec) -> list[tuple[Any, set[str], Optional[str]]]:
    """Every spec whose inputs are checked before the run, with the groups (``later``) whose inputs an earlier stage
    writes and the stage's name: a stage's model when it starts from an earlier stage (or from a folder through a
    transform: then the folder itself is checked), and the blocks that name '@stage:NAME'.  Everything else of a
    later stage (its data files, above all) is checked now, so it is not found only after the earlier stages
    trained."""
    if not spec.stages:
        return [(spec, set(), None)]
    from effitrain.config.inputs import check_model_folder
    from effitrain.config.stages import stage_refs

    checked = []
    for stage, one in zip(spec.stages, spec.stage_specs):
        later = {key for key, value in stage.delta.items() if stage_refs(value)}
        if stage.init not in ("scratch", "previous") and not stage.init.startswith("@stage:") \
                and stage.transform is not None:
            check_model_folder(f"stages.{stage.name}.init", stage.init, revision=None, need_tokenizer=False)
        if stage.init == "previous" or stage.init.startswith("@stage:") or stage.transform is not None:
            later.add("model")
        checked.append((one, later, stage.name))
    return checked


def _hydra_task(cfg) -> int:
    """Called by Hydra once per job, in the job's output directory (the run directory); in a SLURM sweep, inside
    the submitit job (effitrain.cluster.job: requeue, hand-over of a signal stop, failures the head sees)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from effitrain.cluster import job as cluster_job
    from effitrain.config.compose import parse_overrides, recipe_names
    from effitrain.config.tree import load_recipe

    requeue_handler = cluster_job.submitit_requeue_handler()  # before the loop takes SIGUSR2 over
    hydra_cfg = HydraConfig.get()
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved.pop("hydra", None)
    run_dir = Path(hydra_cfg.runtime.output_dir)
    resolved["run_dir"] = str(run_dir)
    resolved["resume"] = cluster_job.resume_after_requeue(run_dir, resolved.get("resume"))
    overrides = [o for o in hydra_cfg.overrides.task if not o.startswith("run_dir=")]  # a sweep's root: not its own
    from effitrain.config.stages import propagate_overrides

    parsed = parse_overrides(overrides)
    propagate_overrides(resolved, parsed)  # `train.max_steps=3` shortens every stage of a multi-stage recipe
    names = recipe_names(parsed)
    recipes = [load_recipe(n).get("recipe") or {"name": n, "paper": "?"} for n in names]
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    if multirun:
        from effitrain.cluster.manifest import fill_sweep_logger
        fill_sweep_logger(resolved, Path(str(hydra_cfg.sweep.dir)), names, overrides)
    # command.txt of a sweep member: its own overrides (in a SLURM job sys.argv is submitit's pickle path)
    argv = ["effitrain", *overrides, f"run_dir={run_dir}"] if multirun else ["effitrain", *sys.argv[1:]]
    code = _train_job(resolved, run_dir, recipes, argv=argv, refused_dir_goes=True)
    if multirun and requeue_handler is None:  # members run in this process (Hydra's basic launcher)
        _sweep_member_done(Path(str(hydra_cfg.sweep.dir)), int(hydra_cfg.job.num), run_dir, overrides, code)
    if multirun and not str(hydra_cfg.sweeper.get("_target_", "")).endswith("BasicSweeper"):
        # a search sweeper (Optuna: +sweep=lr_search) minimises what the task returns: the final eval loss; a run
        # that did not finish is a failed trial (NaN), never a good score
        return _LAST_SUMMARY.get("final_eval_loss") if code == EXIT_OK else float("nan")
    if requeue_handler is not None:
        if code == EXIT_RESUMABLE:
            cluster_job.hand_over_stop(_LAST_SUMMARY, requeue_handler)
        if code != EXIT_OK:
            raise cluster_job.JobFailed(code, _LAST_ERROR[0] if _LAST_ERROR else f"exit status {code}")
    return code


def _sweep_member_done(root: Path, member: int, run_dir: Path, overrides: list[str], code: int) -> None:
    from effitrain.cluster.manifest import member_entry, write_manifest

    _SWEEP_ENTRIES[member] = member_entry(member, run_dir, overrides, code=code,
                                          message=_LAST_ERROR[0] if code != EXIT_OK and _LAST_ERROR else None)
    write_manifest(root, list(_SWEEP_ENTRIES.values()))


def _train_job(cfg: dict, run_dir: Path, recipes: Optional[list], *, argv: list[str],
               refused_dir_goes: bool = False) -> int:
    """Run the config (one run, or a multi-stage recipe's pipeline) with the console captured; turn its outcome into
    an exit status (recorded for the sweep)."""
    from effitrain.console import quiet
    from effitrain.pipeline import run

    code = EXIT_FAILED
    _LAST_SUMMARY.clear()
    _LAST_ERROR.clear()
    try:
        with quiet():
            summary = run(cfg, run_dir=run_dir, argv=argv, recipes=recipes)
        _LAST_SUMMARY.update(summary)
        code = summary.get("exit_code", EXIT_OK)
        if code != EXIT_OK:
            _LAST_ERROR.append(f"stopped at step {summary.get('steps')}: {summary.get('stopped_by')}")
    except ConfigError as exc:  # found only at launch (the device, the world size, a file's contents)
        code = _fail(str(exc))
    except RunFailed as exc:    # the machine failed the run (a full disk): one line, the reason in summary.json
        code = _fail(str(exc), EXIT_FAILED)
    except KeyboardInterrupt:
        print("effitrain: interrupted without saving", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except Exception as exc:    # a bug: keep the traceback, and say where it goes
        _LAST_ERROR[:] = [f"internal error: {type(exc).__name__}: {exc}"]
        import traceback
        traceback.print_exc()
        print(f"effitrain: internal error: {REPORT_BUGS}", file=sys.stderr)
    finally:
        _JOB_EXITS.append(code)
        if refused_dir_goes and code == EXIT_CONFIG and str(run_dir.absolute()) in _NEW_DIRS and run_dir.is_dir() \
                and not any(run_dir.iterdir()):
            run_dir.rmdir()  # refused before the run started: leave no empty folder behind
    return code


def _run_hydra(flags: list[str], overrides: list[str]) -> int:
    import hydra

    main = hydra.main(version_base="1.3", config_path="configs", config_name="train")(_hydra_task)
    saved = sys.argv
    sys.argv = [saved[0], *flags, *overrides]
    _JOB_EXITS.clear()
    _SWEEP_ENTRIES.clear()
    from effitrain.cluster.manifest import written_roots

    written_roots(forget=True)
    try:
        main()
    finally:
        sys.argv = saved
    failed = [c for c in _JOB_EXITS if c != EXIT_OK]
    if len(_JOB_EXITS) > 1 and failed:
        print(f"effitrain: {len(failed)} of {len(_JOB_EXITS)} sweep jobs did not finish (exit statuses "
              f"{_JOB_EXITS})", file=sys.stderr)
    for root in written_roots(forget=True):  # where the members' curves are compared
        print(f"sweep: {len(_JOB_EXITS) - len(failed)} of {len(_JOB_EXITS)} members finished; manifest "
              f"{root / 'sweep.json'}; curves and table: effitrain report {root}")
    return failed[0] if failed else EXIT_OK


def _touches_hydra(overrides: list[str]) -> bool:
    """An override of Hydra's own config (``hydra.run.dir=…``, ``hydra/job_logging=…``) needs Hydra's app."""
    return any(o.lstrip("+~").startswith(("hydra.", "hydra/")) for o in overrides)


def _run_single(composed: Any, overrides: list[str]) -> int:
    """One run, without Hydra's app.  The pre-flight has already composed and checked this very config with Hydra's
    compose API; Hydra's app would compose it twice more (once to find the mode, once to run) only to hand the job
    the same mapping -- about half a second of a one-step run.  What the app gave a single run is done here: the
    absolute run directory (Hydra's ``runtime.output_dir``), a requeued SLURM job continuing its run, and Python's
    logging set up as ``hydra/job_logging: stdout`` sets it.  Sweeps (``-m``), Hydra's flags (``--cfg``,
    ``--info``) and overrides of Hydra's own config still go through the app."""
    from effitrain.cluster.job import resume_after_requeue

    _job_logging()
    cfg = dict(composed.cfg)
    run_dir = Path(cfg["run_dir"]).absolute()
    cfg["run_dir"] = str(run_dir)
    cfg["resume"] = resume_after_requeue(run_dir, cfg.get("resume"))
    _JOB_EXITS.clear()
    return _train_job(cfg, run_dir, composed.recipes, argv=["effitrain", *overrides], refused_dir_goes=True)


def _job_logging() -> None:
    """Python's logging as the app's ``hydra/job_logging: stdout`` (train.yaml) sets it for a job, read from
    Hydra's own file: INFO and up from every library's logger, as plain lines on stdout (the run's third_party.log
    once the console is captured)."""
    import logging.config

    import hydra
    import yaml

    with open(Path(hydra.__file__).parent / "conf" / "hydra" / "job_logging" / "stdout.yaml") as f:
        logging.config.dictConfig(yaml.safe_load(f))


def _continue_if_requeued(overrides: list[str]) -> list[str]:
    """``sbatch --requeue`` of a plain ``effitrain run_dir=R``: a job SLURM started again continues R."""
    from effitrain.cluster.job import resume_after_requeue

    given = [o.split("=", 1)[1] for o in overrides if o.startswith("run_dir=")]
    if not given or any(o.startswith("resume=") for o in overrides):
        return overrides
    return overrides + ["resume=auto"] if resume_after_requeue(Path(given[-1]), None) == "auto" else overrides


def _sweep_root(overrides: list[str]) -> list[str]:
    """A sweep's ``run_dir=R`` is its root: member N runs in R/N (Hydra's ``hydra.sweep.dir``), and R/sweep.json
    is its manifest.  A root that already holds a sweep, a run or anything else is refused, as a run directory
    would be -- whether it is named by ``run_dir`` or by Hydra's own ``hydra.sweep.dir``."""
    from effitrain.cluster.manifest import MANIFEST
    from effitrain.engine.rundir import holds_run

    given = [o.split("=", 1)[1] for o in overrides if o.startswith("run_dir=")]
    hydra_given = [o.split("=", 1)[1] for o in overrides if o.startswith("hydra.sweep.dir=")]
    if not given and not hydra_given:
        return overrides
    key, root = ("hydra.sweep.dir", hydra_given[-1]) if hydra_given else ("run_dir", given[-1])
    if given and hydra_given and Path(given[-1]).absolute() != Path(hydra_given[-1]).absolute():
        raise ConfigError(f"run_dir: '{given[-1]}' and hydra.sweep.dir: '{hydra_given[-1]}' name two roots for one "
                          f"sweep; give one (run_dir=FOLDER: members in FOLDER/0, FOLDER/1, ...)")
    if "," in root:
        raise ConfigError(f"{key}: a sweep has one root folder, got '{root}'; sweep other keys, e.g. "
                          f"run_dir=outputs/my-sweep 'optimizer.lr=1e-3,3e-3'")
    folder = Path(root)
    if folder.is_symlink() and not folder.exists():
        raise ConfigError(f"{key}: '{root}' is a broken or looping symbolic link; choose another folder")
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{key}: '{root}' is a file; a sweep's root is a folder")
    if (folder / MANIFEST).exists() or holds_run(folder):
        raise ConfigError(f"{key}: '{root}' already holds a {'sweep' if (folder / MANIFEST).exists() else 'run'}"
                          f"; choose another {key} for this sweep")
    if folder.is_dir() and any(folder.iterdir()):
        raise ConfigError(f"{key}: '{root}' is a folder that is not empty; a sweep writes its members into "
                          f"{root}/0, {root}/1, ... and {root}/{MANIFEST}, so it starts in a new or empty folder")
    return overrides if hydra_given else [*overrides, f"hydra.sweep.dir={root}"]


def _say_starting(spec, *, multirun: bool) -> None:
    """The first line of a launch, as soon as the config is known to be good: importing torch and starting
    DeepSpeed take seconds before the run has anything of its own to say, and a blank terminal reads as a hang."""
    if os.environ.get("RANK", "0") != "0" or multirun:
        return
    from effitrain.console import say

    recipes = "+".join(r.name for r in spec.recipes) or "default"
    stages = f", {len(spec.stages)} stages" if spec.stages else f", {spec.train.max_steps} step{'s' if spec.train.max_steps != 1 else ''}"
    say(f"effitrain: {recipes} (model={spec.block('model').name}{stages}) in {spec.run_dir}; starting ...")


def _world_size() -> int:
    """The world this launch will train in (torchrun's, srun's, or the environment's variables), after refusing
    variables that describe no world (a stale RANK/WORLD_SIZE left in the shell: effitrain.parallel.dist)."""
    from effitrain.parallel.dist import check_launch_environment, launch_variables

    check_launch_environment(os.environ)
    return int(launch_variables(os.environ)[0].get("WORLD_SIZE", "1"))


def _fail(message: str, code: int = EXIT_CONFIG) -> int:
    _LAST_ERROR[:] = [" ".join(message.split())]
    print(f"effitrain: error: {' '.join(message.split())}", file=sys.stderr)  # one line, whatever the message
    return code


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("effitrain")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown (not installed)"


def _run_verb(verb: str, args: list[str]) -> int:
    """A tool verb; its output piped into a reader that stops early (``effitrain recipes | head``) ends it quietly,
    as it would end ``cat``, instead of with a BrokenPipeError traceback."""
    try:
        code = VERBS[verb](args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # Python flushes stdout again at exit: point it at /dev/null so that flush cannot raise a second time
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in ("-h", "--help", "help"):
            print(__doc__)
            return 0
        if argv and argv[0] == "--version":
            print(f"effitrain {_version()}")
            return 0
        for flag in ("--verbose", "-v"):
            while flag in argv:
                argv.remove(flag)
                os.environ["EFFITRAIN_VERBOSE"] = "1"
        if argv and argv[0] in VERBS:
            return _run_verb(argv[0], argv[1:])
        if argv and not argv[0].startswith("-") and "=" not in argv[0] and not argv[0].startswith("~"):
            from effitrain.registry import did_you_mean
            raise ConfigError(f"unknown command '{argv[0]}'{did_you_mean(argv[0], VERBS)}; commands: "
                              f"{', '.join(VERBS)}; or give overrides like key=value to train")
        flags, overrides = _split_args(argv)
        multirun = "-m" in flags or "--multirun" in flags
        info_only = any(f in flags for f in ("--cfg", "-c", "--info", "-i", "--hydra-help"))
        if not multirun and not info_only:
            overrides = _continue_if_requeued(overrides)
        resumed = None if multirun or info_only else _remembered_resume(overrides)
        if resumed is not None:
            return _verb_resume(resumed)
        if multirun:
            overrides = _sweep_root(overrides)
        if not info_only:
            first = preflight(overrides, multirun=multirun, check_dir=True)
            _say_starting(first[0], multirun=multirun)
    except ConfigError as exc:
        return _fail(str(exc))
    except RunFailed as exc:  # a verb that the machine failed (export onto a full disk): one line, exit 1
        return _fail(str(exc), EXIT_FAILED)
    try:
        if not multirun and not flags and not _touches_hydra(overrides):
            return _run_single(first[1], overrides)
        return _run_hydra(flags, overrides)
    except KeyboardInterrupt:
        print("effitrain: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
