"""``effitrain export CHECKPOINT|RUN_DIR [--out DIR] [--merge-adapters]``: a Hugging Face folder from any checkpoint.

The model is rebuilt from the run's own ``config.yaml`` (and recipes) and the tokenizer the run saved in
``RUN_DIR/tokenizer``; the weights come from the checkpoint: DeepSpeed's consolidated fp32 weights
(``zero_to_fp32``) when the run used ZeRO (stage 3's partitions are gathered offline, no processes needed), the
module state otherwise.  The folder is written like a run's ``final_model`` and loads with
``AutoModelForCausalLM.from_pretrained``.  An adapter model (PEFT) is written as its base model plus ``adapter/``
(the folder's README.md says how to load the pair); ``--merge-adapters`` folds mergeable adapters into the
top-level weights instead and writes no ``adapter/``.

What is exported: a checkpoint folder; a run directory's newest intact checkpoint, or its ``final_model`` when it
kept none; a multi-stage run's last stage (the same choice inside that stage's folder).  The line printed says which.

The target is never half-written and never someone else's: everything is written into a hidden folder beside it
and renamed into place (a kill or a full disk leaves the target as it was); the target must be new, empty or an
earlier ``effitrain export`` (marked by ``.effitrain-export``), which is then replaced; if another export wrote the
target while this one ran, this one refuses instead of replacing it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from effitrain.errors import EXIT_INTERRUPTED, RunFailed
from effitrain.fsutil import fsync_dir, why_missing
from effitrain.registry import ConfigError

TOKENIZER_DIR = "tokenizer"
FINAL_MODEL = "final_model"
MARKER = ".effitrain-export"          # in a finished export: what it was made from, and a unique id
STAGING_MARKER = ".effitrain-staging"  # in a folder being written: the writer's pid and host


class Interrupted(Exception):
    """SIGTERM or Ctrl-C during an export: raised where the process is, so the staging folder is removed."""


# ------------------------------------------------------------------------------------------------ the source
@dataclass
class Source:
    """What an export reads: a checkpoint of a run, or a run's ``final_model`` (already a Hugging Face folder)."""
    path: Path
    run_dir: Path
    is_checkpoint: bool
    note: str = ""   # how it was chosen, when the user named a folder above it


def find_source(path: Path, verb: str = "export") -> Source:
    """A checkpoint folder; a run directory: its newest intact checkpoint, else its final model; a multi-stage run:
    the same in its last stage that has either."""
    from effitrain.run_layout import COMPLETE

    if (path / COMPLETE).is_file():
        return Source(path, path.parent.parent, True)
    stages = _stage_runs(path)
    if stages:
        for stage_dir in reversed(stages):
            found = _run_source(stage_dir, verb)
            if found is not None:
                found.note = f"the last stage of the multi-stage run {path} with a model: {stage_dir.name}, " \
                             f"{found.note or found.path.name}"
                return found
        names = ", ".join(s.name for s in stages)
        raise ConfigError(f"{verb}: '{path}' is a multi-stage run, but none of its stages ({names}) has a checkpoint "
                          f"or a final_model yet; name a checkpoint, e.g. {stages[-1]}/checkpoints/step_N")
    found = _run_source(path, verb)
    if found is not None:
        return found
    if (path / "config.json").is_file():
        raise ConfigError(f"{verb}: '{path}' is already a Hugging Face model folder (it has config.json); load it "
                          f"directly, or name the checkpoint or run it came from")
    if (path / "config.yaml").is_file():
        raise ConfigError(f"{verb}: the run '{path}' has no intact checkpoint and no final_model (it saves "
                          f"checkpoints every train.save_every steps); nothing to {verb}")
    raise ConfigError(f"{verb}: '{path}' is neither a checkpoint (RUN/checkpoints/step_N), a run directory nor a "
                      f"multi-stage run (RUN with stages/)")


def _stage_runs(path: Path) -> list[Path]:
    """The stage folders of a multi-stage run, in their order (their names start with the stage number)."""
    from effitrain.config.stages import STAGES_DIR

    if not (path / STAGES_DIR).is_dir() or (path / "checkpoints").is_dir():
        return []
    return sorted(p for p in (path / STAGES_DIR).iterdir() if p.is_dir() and (p / "config.yaml").is_file())


def _run_source(run_dir: Path, verb: str) -> Optional[Source]:
    from effitrain.console import say
    from effitrain.engine.checkpoint import newest_verified_checkpoint
    from effitrain.run_layout import complete_checkpoints

    if complete_checkpoints(run_dir / "checkpoints"):
        found = newest_verified_checkpoint(run_dir / "checkpoints", report=say)
        if found is None:
            raise ConfigError(f"{verb}: '{run_dir}' has no intact checkpoint (every one failed its checksums)")
        return Source(found, run_dir, True, note=f"its newest checkpoint {found.name}")
    if (run_dir / FINAL_MODEL / "config.json").is_file():
        return Source(run_dir / FINAL_MODEL, run_dir, False, note=f"its {FINAL_MODEL} (the run kept no checkpoint)")
    return None


# ------------------------------------------------------------------------------------------------ the target
def _listing(folder: Path) -> str:
    names = sorted(p.name for p in folder.iterdir())
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def _state(out: Path) -> str:
    """``new`` (missing or empty), ``export:ID`` (an earlier export), or ``foreign`` (anything else)."""
    if not out.is_dir() or not any(out.iterdir()):
        return "new"
    try:
        return "export:" + json.loads((out / MARKER).read_text())["id"]
    except (OSError, ValueError, KeyError, TypeError):
        return "foreign"


def check_target(out: Path) -> str:
    """Refuse a target that is not a new, empty or earlier-export folder, or cannot be written; returns its state."""
    if os.path.lexists(out) and not out.exists():
        raise ConfigError(f"export: --out '{out}' {why_missing(out)}")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"export: --out '{out}' is a file; name a folder to write the model into")
    state = _state(out)
    if state == "foreign":
        raise ConfigError(f"export: --out '{out}' is not empty and is not an earlier export (it holds "
                          f"{_listing(out)}); effitrain never writes into a folder of other files; choose another "
                          f"--out")
    parent = out.absolute().parent
    anchor = parent
    while not anchor.exists() and anchor != anchor.parent:
        anchor = anchor.parent
    if not anchor.is_dir():
        raise ConfigError(f"export: --out '{out}' lies below '{anchor}', which is a file")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise ConfigError(f"export: cannot write beside '{out}' ('{anchor}' is read-only or not yours); "
                          f"choose another --out")
    return state


def _alive(pid: int, host: str) -> bool:
    if host != socket.gethostname():
        return True  # another machine's process: never assume it is gone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_staging(out: Path) -> None:
    """Staging folders of exports into ``out`` that were killed (SIGKILL: no chance to clean up) on this host."""
    for folder in out.parent.glob(f".{out.name}.export-*"):
        try:
            record = json.loads((folder / STAGING_MARKER).read_text())
        except (OSError, ValueError):
            continue  # not ours: never touched
        if not _alive(int(record.get("pid", 0)), str(record.get("host"))):
            shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A hidden folder beside ``out`` to write into; removed again unless it was renamed into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(out)
    tmp = out.parent / f".{out.name}.export-{os.getpid()}-{time.time_ns()}"
    tmp.mkdir()
    (tmp / STAGING_MARKER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder`` itself (no lock file left among the user's files); held only for renames."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def commit(tmp: Path, out: Path, seen: str) -> None:
    """Rename the finished staging folder to ``out``, replacing the earlier export that was there when the export
    started (``seen``).  Signals wait until the renames are done, so ``out`` is always a whole export."""
    (tmp / STAGING_MARKER).unlink()
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        with _locked(out.parent):
            now = _state(out)
            if now != seen:
                what = "another export" if now.startswith("export:") else "something else"
                raise ConfigError(f"export: '{out}' was written by {what} while this export ran; nothing was "
                                  f"replaced (run it again to replace that export, or choose another --out)")
            aside = None
            if out.is_dir():  # an empty folder or the earlier export: moved aside, removed once the new one is in
                aside = out.parent / f".{out.name}.replaced-{os.getpid()}-{time.time_ns()}"
                out.rename(aside)
            tmp.rename(out)
            fsync_dir(out.parent)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _disk_full(exc: BaseException, folder: Path) -> bool:
    """Libraries word a full disk differently (safetensors wraps the OS error in its own), so the disk is asked."""
    if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return shutil.disk_usage(folder).free < 2 ** 20
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------ the model
def _state_dict(checkpoint: Path) -> dict[str, Any]:
    import torch

    ds = checkpoint / "ds"
    if any(ds.glob("*optim_states.pt")) and any(ds.glob("zero_pp_rank_*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag="ds")
    states = sorted(ds.glob("mp_rank_*_model_states.pt"))
    if not states:
        raise ConfigError(f"export: {checkpoint} holds no DeepSpeed model states under ds/")
    return torch.load(states[0], map_location="cpu", weights_only=False)["module"]


def load_tokenizer(folder: Path, verb: str = "export") -> Any:
    """The tokenizer a run saved; a damaged file is named with its line and column, not a traceback."""
    from transformers import AutoTokenizer

    for path in sorted(folder.glob("*.json")):
        try:
            json.loads(path.read_bytes())
        except UnicodeDecodeError:
            raise ConfigError(f"{verb}: the tokenizer file {path} is not UTF-8 text (damaged?)") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{verb}: the tokenizer file {path} is not valid JSON (line {exc.lineno}, column "
                              f"{exc.colno}: {exc.msg}); it was damaged after the run saved it") from None
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # tokenizers' own errors are plain Exceptions from Rust
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"{verb}: the tokenizer in {folder} cannot be loaded ({first})") from None


def _check_fits(model: Any, state: dict[str, Any], run_dir: Path) -> None:
    """Refuse weights whose shapes differ from the model the run's config.yaml describes (an edited config)."""
    own = model.state_dict()
    wrong = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items()
             if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        key, saved, built = wrong[0]
        raise ConfigError(f"export: the checkpoint does not fit the model {run_dir}/config.yaml describes: {key} is "
                          f"{list(saved)} in the checkpoint but {list(built)} in that model ({len(wrong)} tensor(s) "
                          f"differ); was config.yaml edited after the run?")
    missing, unexpected = [k for k in own if k not in state], [k for k in state if k not in own]
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if not any(k.endswith(t) for t in tied)]
    if missing or unexpected:
        raise ConfigError(f"export: the checkpoint does not fit the run's model (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})")


def _model_from_checkpoint(source: Source, merge_adapters: bool) -> tuple[Any, Any]:
    from effitrain.config.resume import stored_config, stored_recipes
    from effitrain.config.spec import validate
    from effitrain.engine.checkpoint import CheckpointDamaged, verify_checkpoint
    from effitrain.models.training_only import strip_state
    from effitrain.peft.adapters import is_mergeable, is_peft_model

    try:
        verify_checkpoint(source.path)
    except CheckpointDamaged as exc:
        raise ConfigError(f"export: {exc}") from None
    cfg = stored_config(source.run_dir)
    spec = validate(cfg, stored_recipes(source.run_dir, cfg))
    tokenizer_dir = source.run_dir / TOKENIZER_DIR
    if not tokenizer_dir.is_dir():
        raise ConfigError(f"export: {source.run_dir} has no saved tokenizer ({TOKENIZER_DIR}/); runs made before "
                          f"effitrain saved it can export only their final_model")
    tokenizer = load_tokenizer(tokenizer_dir)
    model = spec.block("peft").build(spec.block("model").build(tokenizer=tokenizer))
    if merge_adapters and is_peft_model(model) and not is_mergeable(model):
        raise ConfigError(f"export: --merge-adapters: this run's adapter ({spec.block('peft').name}) adds computation "
                          f"and cannot be folded into the weights; export without --merge-adapters (base + adapter/)")
    state = strip_state(_state_dict(source.path))  # e.g. a hint regressor that trained with the model: not exported
    _check_fits(model, state, source.run_dir)
    model.load_state_dict(state, strict=False)
    model.eval()
    return model, tokenizer


def _copy_final_model(source: Source, tmp: Path, merge_adapters: bool) -> dict[str, Any]:
    """A run's final_model as it is; ``--merge-adapters`` leaves out ``adapter/`` (the top level is merged)."""
    info_path = source.path / "effitrain_export.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    if merge_adapters and info.get("adapter") and not info.get("merged"):
        raise ConfigError(f"export: --merge-adapters: {source.path} holds an adapter that cannot be folded into the "
                          f"weights (merged: false); export without --merge-adapters")
    skip = {"adapter"} if merge_adapters else set()
    for item in source.path.iterdir():
        if item.name in skip:
            continue
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
    if merge_adapters and info.get("adapter"):
        info["adapter"] = None
        (tmp / "effitrain_export.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def _readme(info: dict[str, Any], source: Source) -> str:
    """How to load the folder: a plain (or merged) model, or the base with its adapter on top."""
    lines = ["# effitrain export", "", f"Made by `effitrain export` from `{source.path}`.", ""]
    if info.get("adapter"):
        lines += ["The top level is the base model without the adapter; `adapter/` holds the adapter. Its "
                  "`adapter_config.json` names its base as `..` (this folder, seen from `adapter/`), so the pair "
                  "can be moved or copied together. Load the trained model with:", "",
                  "```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM, "
                  "AutoTokenizer", "",
                  'base = AutoModelForCausalLM.from_pretrained("THIS_FOLDER")',
                  'model = PeftModel.from_pretrained(base, "THIS_FOLDER/adapter")',
                  'tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER")', "```", "",
                  "`AutoPeftModelForCausalLM` would look for `..` from the working directory, not from `adapter/`; "
                  "to publish the adapter alone, set `base_model_name_or_path` to the base model's hub id.", ""]
    else:
        lines += ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  'model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER")',
                  'tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER")', "```", ""]
        if info.get("merged"):
            lines += ["Adapters or structured layers were folded into these weights: no extra package is needed.", ""]
    if info.get("note"):
        lines += [f"Note: {info['note']}.", ""]
    return "\n".join(lines)


def export_checkpoint(path: Path, out: Optional[Path] = None, merge_adapters: bool = False) -> Path:
    """Export ``path`` (see :func:`find_source`) to ``out`` (default ``RUN/exports/NAME``); returns ``out``."""
    from effitrain.console import say
    from effitrain.peft.adapters import export_final_model

    source = find_source(path)
    if source.note:
        say(f"exporting {source.path} ({source.note})")
    out = Path(out) if out is not None else source.run_dir / "exports" / source.path.name
    seen = check_target(out)
    model = tokenizer = None
    if source.is_checkpoint:
        model, tokenizer = _model_from_checkpoint(source, merge_adapters)
    with staging(out) as tmp:
        try:
            if source.is_checkpoint:
                info = export_final_model(model, tokenizer, tmp, merge=merge_adapters, keep_adapter=not merge_adapters)
            else:
                info = _copy_final_model(source, tmp, merge_adapters)
            (tmp / "README.md").write_text(_readme(info, source))
            (tmp / MARKER).write_text(json.dumps({"id": f"{socket.gethostname()}-{os.getpid()}-{time.time_ns()}",
                                                  "source": str(source.path), "time": time.time()}) + "\n")
        except (ConfigError, Interrupted, KeyboardInterrupt):
            raise
        except Exception as exc:
            if _disk_full(exc, tmp.parent):
                free = shutil.disk_usage(tmp.parent).free
                raise RunFailed(f"export: the disk holding '{out.absolute().parent}' is full ({free / 2**20:.0f} MiB "
                                f"free); nothing was written to '{out}' (free some space and export again)") from None
            raise
        commit(tmp, out, seen)
    return out


# ------------------------------------------------------------------------------------------------ the verb
def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signal.Signals(signum).name)


def export_main(args: list[str]) -> int:
    merge = "--merge-adapters" in args
    rest = [a for a in args if a != "--merge-adapters"]
    out = None
    if "--out" in rest:
        i = rest.index("--out")
        if i + 1 >= len(rest):
            raise ConfigError("export: --out needs a folder")
        out = Path(rest[i + 1])
        rest = rest[:i] + rest[i + 2:]
    unknown = [a for a in rest if a.startswith("--")]
    if unknown:
        raise ConfigError(f"export: unknown option '{unknown[0]}'; options: --out DIR, --merge-adapters")
    if len(rest) != 1:
        raise ConfigError("export: name one checkpoint or run directory, e.g. "
                          "'effitrain export outputs/run/checkpoints/step_00000100 --out my-model'")
    path = Path(rest[0])
    if not path.exists():
        raise ConfigError(f"export: '{path}' {why_missing(path)}")
    from effitrain.console import quiet, say

    # SIGTERM (a cluster's time limit, a `kill`) must not leave a half-written folder: raised as an exception here,
    # the staging folder is removed on the way out
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    stopped = None
    try:
        with quiet():
            try:
                written = export_checkpoint(path, out, merge)
                say(f"exported {path} to {written}")
            except (Interrupted, KeyboardInterrupt) as exc:
                stopped = str(exc) or "SIGINT"
    finally:
        signal.signal(signal.SIGTERM, previous)
    if stopped:
        print(f"effitrain: export interrupted ({stopped}); nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0
