"""The `effitrain` command: tool verbs, or a Hydra training run (single or `-m` sweep).

    effitrain [OVERRIDES]                 train (the default job: a tiny Llama on the built-in corpus)
    effitrain +recipe=NAME [OVERRIDES]    train with a paper's method; '+recipe=[a,b]' stacks two
    effitrain -m +recipe=a,b KEY=v1,v2    sweep with Hydra's launcher (hydra/launcher=...)
    effitrain recipes                     list the recipes: name, paper, blocks touched
    effitrain show NAME [OVERRIDES]       print the resolved config of a recipe ('default' = no recipe)
    effitrain check [OVERRIDES]           validate only (keys, types, ranges, compatibility rules)
    effitrain diff A B                    the keys in which two recipes' resolved configs differ
    effitrain rules                       the compatibility rules as a table
    effitrain select [OVERRIDES]          run the data-selection stage alone and write its manifest

Every configuration error is one line on stderr and exit status 2, before any model, data or run directory is made.
The verbs import neither torch nor deepspeed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Optional

from effitrain.registry import ConfigError

EXIT_CONFIG = 2
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
    spec, _ = preflight(args, multirun=False, check_dir=True, deep=True)  # deep: reads local data files through
    names = ", ".join(r.name for r in spec.recipes) or "none"
    blocks = ", ".join(f"{g}={b.name}" for g, b in spec.blocks.items())
    print(f"ok: recipes [{names}]; {blocks}; methods [{', '.join(spec.methods) or 'none'}]")
    return 0


def _verb_diff(args: list[str]) -> int:
    from effitrain.config.compose import compose_config, flatten

    if len(args) < 2:
        raise ConfigError("diff: name two recipes, e.g. 'effitrain diff baseline wsd'")
    flats = []
    for name in args[:2]:
        flat = flatten("", compose_config(_recipe_overrides(name) + args[2:]).cfg, {})
        flat = {k: v for k, v in flat.items() if not k.startswith(("recipe.", "run_dir"))}
        flats.append(flat)
    a, b = flats
    keys = sorted(k for k in set(a) | set(b) if a.get(k, "<unset>") != b.get(k, "<unset>"))
    for key in keys:
        print(f"{key}: {a.get(key, '<unset>')!r} -> {b.get(key, '<unset>')!r}")
    if not keys:
        print("no differences")
    return 0


def _verb_rules(args: list[str]) -> int:
    from effitrain.config.rules import rules_table
    from effitrain.registry import load_builtin_blocks

    load_builtin_blocks()
    print(rules_table())
    return 0


def _verb_select(args: list[str]) -> int:
    from effitrain.selection.stage import select_main

    return select_main(args)


VERBS: dict[str, Callable[[list[str]], int]] = {
    "recipes": _verb_recipes, "show": _verb_show, "check": _verb_check, "diff": _verb_diff, "rules": _verb_rules,
    "select": _verb_select,
}


# ---------------------------------------------------------------------------------------------- training
def preflight(overrides: list[str], *, multirun: bool, check_dir: bool, deep: bool = False):
    """Compose and validate (every job of a sweep); check the inputs (files, folders, credentials; ``deep``: every
    record of local data); refuse to reuse a run directory.  Builds nothing."""
    from effitrain.config.compose import compose_config, expand_sweeps
    from effitrain.config.inputs import check_inputs
    from effitrain.config.rules import Environment, check_rules
    from effitrain.config.spec import validate
    from effitrain.engine.rundir import check_run_dir

    jobs = expand_sweeps(overrides) if multirun else [overrides]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    first = None
    for job in jobs:
        composed = compose_config(job)
        spec = validate(composed.cfg, composed.recipes)
        check_rules(spec, Environment(world_size=world))
        check_inputs(spec, deep=deep)
        if check_dir and not multirun and spec.run_dir:
            check_run_dir(Path(spec.run_dir), resume=spec.resume, overwrite=spec.overwrite)
        first = first or (spec, composed)
    return first


def _hydra_task(cfg) -> None:
    """Called by Hydra once per job, in the job's output directory (the run directory)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from effitrain.config.compose import load_recipe, parse_overrides, recipe_names
    from effitrain.train import train

    hydra_cfg = HydraConfig.get()
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved.pop("hydra", None)
    run_dir = Path(hydra_cfg.runtime.output_dir)
    resolved["run_dir"] = str(run_dir)
    names = recipe_names(parse_overrides(list(hydra_cfg.overrides.task)))
    recipes = [load_recipe(n).get("recipe") or {"name": n, "paper": "?"} for n in names]
    try:
        train(resolved, run_dir=run_dir, argv=["effitrain", *sys.argv[1:]], recipes=recipes)
    except ConfigError as exc:  # found only at launch (the device, the world size, a missing file)
        sys.exit(_fail(str(exc)))  # SystemExit passes through Hydra's handler: no traceback


def _run_hydra(flags: list[str], overrides: list[str]) -> int:
    import hydra

    main = hydra.main(version_base="1.3", config_path="configs", config_name="train")(_hydra_task)
    saved = sys.argv
    sys.argv = [saved[0], *flags, *overrides]
    try:
        main()
    finally:
        sys.argv = saved
    return 0


def _fail(message: str) -> int:
    print(f"effitrain: error: {message}", file=sys.stderr)
    return EXIT_CONFIG


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in ("-h", "--help", "help"):
            print(__doc__)
            return 0
        if argv and argv[0] in VERBS:
            return VERBS[argv[0]](argv[1:])
        if argv and not argv[0].startswith("-") and "=" not in argv[0] and not argv[0].startswith("~"):
            from effitrain.registry import did_you_mean
            raise ConfigError(f"unknown command '{argv[0]}'{did_you_mean(argv[0], VERBS)}; commands: "
                              f"{', '.join(VERBS)}; or give overrides like key=value to train")
        flags, overrides = _split_args(argv)
        multirun = "-m" in flags or "--multirun" in flags
        info_only = any(f in flags for f in ("--cfg", "-c", "--info", "-i", "--hydra-help"))
        if not info_only:
            preflight(overrides, multirun=multirun, check_dir=True)
    except ConfigError as exc:
        return _fail(str(exc))
    try:
        return _run_hydra(flags, overrides)
    except KeyboardInterrupt:
        print("effitrain: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
