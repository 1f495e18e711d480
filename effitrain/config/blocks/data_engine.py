"""The run-level ``data:`` section: where the data stage of a run over files executes (the sharded data engine,
:mod:`effitrain.data.engine`), and the rules of what that engine covers so far.

``data.executor`` null (the default) keeps the in-memory path.  ``local`` runs datatrove's tasks as processes on
this machine, ``slurm`` as a SLURM job array whose partition, time and memory come from a launcher preset (the files
of ``hydra/launcher``, the same the training jobs use; ``data.slurm.*`` overrides them for the data tasks alone),
``ray`` on a running Ray cluster.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

from effitrain.config.rules import rule
from effitrain.registry import ConfigError, choices_text, did_you_mean, param


@dataclass
class SlurmKeys:
    """``data.slurm.*``: the data tasks' own values of the launcher preset's keys (null: the preset's value)."""

    partition: Optional[str] = param(None, help="SLURM partition of the data tasks (null: the preset's; a null "
                                                "there too: the cluster's default partition)")
    account: Optional[str] = param(None, help="--account of the data tasks (null: the preset's)")
    qos: Optional[str] = param(None, help="--qos of the data tasks (null: the preset's, else the cluster's default)")
    cpus_per_task: Optional[int] = param(None, ge=1, help="CPUs of one data task (null: the preset's)")
    mem_gb: Optional[int] = param(None, ge=1, help="memory of one data task in GB (null: the preset's mem_gb)")
    timeout_min: Optional[int] = param(None, ge=1, help="time limit of one data task in minutes (null: the "
                                                        "preset's timeout_min)")


@dataclass
class DataParams:
    executor: Optional[Literal["local", "slurm", "ray"]] = param(
        None, help="null: the data stage runs in this process; local | slurm | ray: a sharded datatrove pipeline "
                   "over the files of dataset=local, training from memory-mapped token shards")
    tasks: int = param(1, ge=1, help="datatrove tasks the files are split into (each file is read by one task)")
    workers: Optional[int] = param(None, ge=1, help="tasks running at once (null: local = min(tasks, CPUs); "
                                                    "slurm/ray = all)")
    slurm_preset: str = param("slurm", help="data.executor=slurm: the hydra/launcher preset whose partition, account, "
                                            "qos, cpus_per_task, mem_gb and timeout_min each task gets")
    slurm: SlurmKeys = param(default_factory=SlurmKeys, help="data.executor=slurm: the preset's keys overridden "
                                                             "for the data tasks only")

    def validate(self, path: str) -> None:
        if self.executor == "slurm":
            from effitrain.config.launcher import presets

            valid = presets()
            if self.slurm_preset not in valid:
                raise ConfigError(f"{path}.slurm_preset: unknown launcher preset '{self.slurm_preset}'"
                                  f"{did_you_mean(self.slurm_preset, valid)}; valid: {choices_text(valid)}")
            resources = slurm_resources(self.slurm_preset, self.slurm)
            for key in ("cpus_per_task", "mem_gb", "timeout_min"):  # what each task's sbatch line must state
                if resources[key] is None:
                    raise ConfigError(f"{path}.slurm.{key}: the data tasks' SLURM array needs {_NEEDS[key]}, and "
                                      f"preset '{self.slurm_preset}' sets {key}: null; set {path}.slurm.{key}=N or "
                                      f"{key} in effitrain/configs/hydra/launcher/{self.slurm_preset}.yaml")

    def engine_settings(self) -> Any:
        """What the data engine needs of this section (:class:`effitrain.data.engine.EngineSettings`); the SLURM
        resources read from the launcher preset here, in the config layer."""
        from effitrain.data.engine import EngineSettings

        slurm = slurm_resources(self.slurm_preset, self.slurm) if self.executor == "slurm" else {}
        return EngineSettings(executor=self.executor, tasks=self.tasks, workers=self.workers, slurm=slurm)


# datatrove's SLURM executor writes --cpus-per-task, the memory and --time into every array it submits, so where a
# training job may leave them to the cluster (null), a data array cannot; a null partition, qos or account is left
# out of the script (the cluster's default), as for the training jobs
_NEEDS = {"cpus_per_task": "a CPU count", "mem_gb": "a memory size", "timeout_min": "a time limit"}
_PRESET_KEYS = ("partition", "account", "qos", "cpus_per_task", "mem_gb", "timeout_min", "name")


def _preset_body(preset: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """A preset's keys with those of the presets it names in ``defaults`` beneath them (``slurm_gpu`` builds on
    ``slurm``), as Hydra composes them for a training job; submitit's own base (``submitit_slurm``) sets none of
    the keys read here but ``partition``/``qos``/``account``, all null there."""
    import yaml

    from effitrain.config.tree import config_root

    with open(config_root() / "hydra" / "launcher" / f"{preset}.yaml", encoding="utf-8") as fh:
        body = yaml.safe_load(fh) or {}
    merged: dict[str, Any] = {}
    for entry in body.get("defaults") or ():
        name = entry if isinstance(entry, str) else None
        if name and name not in seen and (config_root() / "hydra" / "launcher" / f"{name}.yaml").is_file():
            merged.update(_preset_body(name, (*seen, preset)))
    merged.update({k: v for k, v in body.items() if k != "defaults"})
    return merged


def slurm_resources(preset: str, overrides: Optional[SlurmKeys] = None) -> dict[str, Any]:
    """partition, account, qos, cpus_per_task, mem_gb, timeout_min and name of a ``hydra/launcher`` preset (its
    ``defaults`` included), each replaced by ``data.slurm.KEY`` where that is set."""
    body = _preset_body(preset)
    resources = {key: body.get(key) for key in _PRESET_KEYS}
    for key, value in vars(overrides or SlurmKeys()).items():
        if value is not None:
            resources[key] = value
    return resources


# -------------------------------------------------------------------------------------------------------- rules
_LATER = "(issue 24: selection and whole-corpus curricula as sharded jobs are later slices)"


def _sharded(spec: Any) -> bool:
    return getattr(getattr(spec, "data", None), "executor", None) is not None


@rule("data_executor_reads_local_files", "data.executor shards the files of dataset=local; the demo and hub sources "
                                         "stay in-process")
def _executor_needs_files(spec, env) -> Optional[str]:
    dataset = spec.block("dataset")
    if _sharded(spec) and dataset.name != "local":
        return (f"data.executor={spec.data.executor} runs over the files of dataset=local; dataset={dataset.name} "
                f"stays in this process (drop data.executor, or use dataset=local dataset.path='DIR/*.jsonl')")
    return None


@rule("data_executor_text_packing_only", "data.executor packs plain documents (concatenated or decomposed): no "
                                         "generated or conditioned rows")
def _executor_plain_packing(spec, env) -> Optional[str]:
    if not _sharded(spec):
        return None
    p = spec.block("dataset").params
    for key, on in (("procedural_docs", getattr(p, "procedural_docs", 0) > 0),
                    ("control_tokens", getattr(p, "control_tokens", None) is not None)):
        if on:
            return f"dataset.{key} is not built by the sharded data engine yet {_LATER}; drop it or data.executor"
    return None


# the selections with a map/reduce form (effitrain.selection.sharded_*), by scorer, with the selectors each cuts with
SHARDED_SELECTIONS = ("none", "dsir", "dedup", "quality_classifier", "perplexity", "zip_fit", "random",
                      "diversity_kmeans")
_SHARDED_SCORERS = {"dsir": ("gumbel_topk",), "minhash_dedup": ("random",), "embedding_kmeans": ("cluster_balanced",),
                    **{s: ("topk", "window", "random") for s in ("quality_classifier", "perplexity", "zip_fit",
                                                               "uniform")}}
_SINGLE_NODE = {"less": "its per-example LoRA gradient features", "loss_trajectory": "its proxy's loss trajectories"}


def sharded_refusal(name: str, params: Any) -> Optional[str]:
    """Why ``selection=name`` cannot run with data.executor (None when it can)."""
    supported = f"with data.executor use selection={', '.join(SHARDED_SELECTIONS)}, or drop data.executor"
    if name == "none":
        return None
    scorer = params.scorer["name"]
    if scorer in _SINGLE_NODE:
        return (f"selection={name} stays on one node ({_SINGLE_NODE[scorer]} need the model and the whole pool in "
                f"one process); {supported}")
    if scorer not in _SHARDED_SCORERS:
        return f"selection={name} does not run on the sharded data engine yet {_LATER}; {supported}"
    selector = params.selector["name"]
    if selector not in _SHARDED_SCORERS[scorer]:
        return (f"selection.selector.name={selector}: with data.executor, scorer {scorer} cuts with "
                f"{' or '.join(_SHARDED_SCORERS[scorer])} over the whole pool; change it or drop data.executor")
    if getattr(params, "domains", None) is not None:
        return "selection.domains: with data.executor a selection runs over the whole pool; drop it or data.executor"
    t = params.target
    if t is not None and t.domain is not None and t.split != "train":
        return (f"selection.target.split={t.split}: with data.executor a target domain is drawn from the train "
                f"split; use split=train or selection.target.path")
    return None


@rule("data_executor_sharded_selections", "data.executor: only selections with a sharded form (none, dsir, dedup, "
                                          "quality_classifier, perplexity, zip_fit, random, diversity_kmeans) run "
                                          "as sharded jobs")
def _executor_selection(spec, env) -> Optional[str]:
    if not _sharded(spec):
        return None
    selection = spec.block("selection")
    return sharded_refusal(selection.name, selection.params)


@rule("data_executor_row_curricula", "data.executor: curricula that order rows by index, domain or a score (a "
                                     "scorer's, DELT's proxy); in-context chains, MeCo's conditioned rows "
                                     "and Untie the Knots' rows are built as sharded jobs")
def _executor_curricula(spec, env) -> Optional[str]:
    curriculum = spec.block("curriculum")
    if not _sharded(spec):
        return None
    params = curriculum.params
    # a curriculum with a sharded form builds its rows in the data engine: in-context chains (an order of the
    # documents), MeCo (a header before every document); one that scores rows (a curriculum.scorer, DELT's LQS
    # proxy) reads the shards' rows a block at a time
    sharded_form = getattr(params, "sharded_order", False) or hasattr(params, "sharded_condition") or \
        hasattr(params, "sharded_knots")
    if getattr(params, "needs_documents", False) and not sharded_form:
        return (f"curriculum={curriculum.name} re-packs the documents, which the sharded data engine does not do yet "
                f"{_LATER}; use shuffle, sequential, mixture, domain_phases, skill_it, seta, in_context, meco, "
                f"untie_knots, difficulty, scored_order or delt")
    return None
