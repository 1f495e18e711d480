"""Task evaluation with EleutherAI's lm-evaluation-harness (``eval=lm_eval``, ``effitrain evaluate``).

The harness evaluates a Hugging Face model folder: the run's ``final_model/`` when training finishes, or what
``effitrain export`` makes of a checkpoint.  Its own tasks load their datasets from the hub (network or a warm
cache); the local tasks below ship with effitrain and run offline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

from effitrain.config.eval_tasks import check_tasks, local_tasks
from effitrain.registry import ConfigError

def run_lm_eval(model_dir: Path, params: Any, *, device: str = "cpu") -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` of ``params.tasks`` on the model saved in ``model_dir``."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise ConfigError("eval=lm_eval needs EleutherAI's harness: pip install 'lm-eval[hf]' "
                          "(it is in effitrain's [eval] extra)") from None
    manager = check_tasks(params)
    local = local_tasks()
    tasks: list[Any] = [local.get(name, name) for name in params.tasks]
    # Loaded here and handed over as objects: given a path, the harness starts Accelerate, which would try to join
    # a process group from the environment a training run leaves behind.
    hf_model, tokenizer = load_model(model_dir, device)
    model = HFLM(pretrained=hf_model, tokenizer=tokenizer, batch_size=params.batch_size)
    out = lm_eval.simple_evaluate(model=model, tasks=tasks, num_fewshot=params.num_fewshot, limit=params.limit,
                                  task_manager=manager, log_samples=False)
    results: dict[str, dict[str, float]] = {}
    for task, metrics in (out or {}).get("results", {}).items():
        results[task] = {k.split(",")[0]: float(v) for k, v in metrics.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return results


def format_results(results: dict[str, dict[str, float]]) -> str:
    parts = []
    for task, metrics in results.items():
        shown = [f"{k}={v:.4g}" for k, v in metrics.items() if not k.endswith("_stderr")]
        err = [f"±{v:.2g}" for k, v in metrics.items() if k.endswith("_stderr")]
        parts.append(f"{task}: {' '.join(shown)}{' (' + err[0] + ')' if err else ''}")
    return "; ".join(parts)


def build_none(params: Any) -> Optional[Callable[[Path], dict]]:
    return None


def build_lm_eval(params: Any) -> Callable[..., dict]:
    def evaluate(model_dir: Path, device: str = "cpu") -> dict:
        return run_lm_eval(model_dir, params, device=device)

    return evaluate


def check_weights(folder: Path, verb: str = "evaluate") -> None:
    """Refuse a safetensors file that is cut short: its header says how many bytes the tensors take, so a file that
    a full disk or an interrupted copy truncated is found before transformers fails on it with a traceback."""
    for path in sorted(folder.glob("*.safetensors")):
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if length < 0 or 8 + length > size:
                raise ConfigError(f"{verb}: {path} is truncated or not a safetensors file ({size:,} bytes; it "
                                  f"cannot hold its own header); copy or export the model again")
            try:
                header = json.loads(fh.read(length))
            except ValueError:
                raise ConfigError(f"{verb}: {path} has a damaged header (not JSON); copy or export the model again") \
                    from None
        ends = [t["data_offsets"][1] for name, t in header.items() if name != "__metadata__"
                and isinstance(t, dict) and isinstance(t.get("data_offsets"), list) and len(t["data_offsets"]) == 2]
        needed = 8 + length + max(ends, default=0)
        if size < needed:
            raise ConfigError(f"{verb}: {path} is truncated ({size:,} bytes of the {needed:,} its header describes); "
                              f"copy or export the model again")


def check_model_dir(folder: Path) -> None:
    """What ``evaluate`` needs of a Hugging Face folder before the harness starts: a config transformers can read,
    whole weights, and a top level that is the trained model (not a base whose adapter could not be merged)."""
    from effitrain.config.inputs import check_model_folder

    check_model_folder("evaluate", str(folder), revision=None, need_tokenizer=True)
    config = json.loads((folder / "config.json").read_text())
    if not isinstance(config, dict) or not config.get("model_type"):
        raise ConfigError(f"evaluate: {folder}/config.json names no model_type, so transformers cannot tell which "
                          f"model class to build (a config.json written by save_pretrained has one)")
    check_weights(folder)
    record = folder / "effitrain_export.json"
    try:
        info = json.loads(record.read_text()) if record.is_file() else {}
    except ValueError:
        info = {}
    if isinstance(info, dict) and info.get("adapter") and info.get("merged") is False:
        raise ConfigError(f"evaluate: the top level of {folder} is the base model without its adapter (it could not "
                          f"be merged: {', '.join(info.get('peft_type') or ['?'])}); the harness would score the "
                          f"base, not the trained model")


def load_model(folder: Path, device: str) -> tuple[Any, Any]:
    """The model and tokenizer in ``folder``; a folder transformers cannot load is one line naming it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder)).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # transformers, safetensors and tokenizers each raise their own kinds
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"evaluate: cannot load the model in {folder} ({type(exc).__name__}: {first})") from None
    return model, tokenizer


def evaluate_main(args: list[str]) -> int:
    """``effitrain evaluate PATH [eval.tasks=[a,b]] [eval.limit=N]``: PATH is a model folder, a checkpoint, a run
    directory (its newest intact checkpoint, exported first; its final_model when it kept none) or a multi-stage run
    (the same in its last stage)."""
    import tempfile

    from effitrain.config.compose import compose_config
    from effitrain.config.spec import validate
    from effitrain.console import quiet, say
    from effitrain.export import export_checkpoint, find_source
    from effitrain.fsutil import why_missing

    if not args or "=" in args[0]:
        raise ConfigError("evaluate: name a model folder, checkpoint or run directory, e.g. "
                          "'effitrain evaluate outputs/run/final_model eval.tasks=[demo_arithmetic]'")
    path, overrides = Path(args[0]), args[1:]
    if not path.exists():
        raise ConfigError(f"evaluate: '{path}' {why_missing(path)}")
    bad = [o for o in overrides if not o.startswith("eval.")]
    if bad:
        raise ConfigError(f"evaluate: only eval.* keys may be given, not '{bad[0]}'")
    params = validate(compose_config(["eval=lm_eval", *overrides]).cfg).block("eval").params
    check_tasks(params)
    source = None if (path / "config.json").is_file() else find_source(path, verb="evaluate")
    model_dir = path if source is None else source.path
    if source is None or not source.is_checkpoint:
        check_model_dir(model_dir)
    if source is not None and source.note:
        say(f"evaluating {source.path} ({source.note})")
    with quiet(), tempfile.TemporaryDirectory() as tmp:
        if source is not None and source.is_checkpoint:
            model_dir = export_checkpoint(source.path, Path(tmp) / "model", merge_adapters=True)
        results = run_lm_eval(model_dir, params)
        say(format_results(results))
        say(json.dumps(results, sort_keys=True))
    return 0
