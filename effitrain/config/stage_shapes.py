"""The models the stages of a pipeline hand each other, as far as they are known before any stage trains.

A later stage's transform and run config are checked against the model the earlier stages will produce: ``stack_layers``
may copy only layers that exist, ``merge_adapters`` needs a stage before it that trained a mergeable adapter, and a
stage's ``dataset.seq_len`` must fit the positions of the model it inherits.  Without this, those refusals came only
when the pipeline reached the stage, after the earlier stages had trained (and, with ``overwrite=true``, after the
old pipeline had been deleted).  Torch-free: shapes come from the model blocks' parameters and from the
``config.json`` of folders that exist now; what cannot be known is ``None`` and is not checked.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

#: kinds of adapter a stage's final model carries in ``adapter/`` (peft params declare ``ADAPTER``)
MERGEABLE, PROMPT = "mergeable", "prompt"


@dataclass(frozen=True)
class ModelShape:
    """What later stages need to know about a model; ``None``: not known before the run."""
    source: str                      # what this is the shape of, for messages
    layers: Optional[int] = None     # decoder layers
    positions: Optional[int] = None  # the longest sequence the model takes
    adapter: Optional[str] = None    # the adapter a stage trained on it: MERGEABLE, PROMPT or None
    adapter_name: Optional[str] = None  # its peft block, for messages

    def replace(self, **changes: Any) -> "ModelShape":
        return dataclasses.replace(self, **changes)


def folder_shape(path: str, source: str) -> ModelShape:
    """The shape in a ``save_pretrained`` folder's ``config.json`` (unknown when it cannot be read)."""
    from effitrain.config.inputs import model_config_json, position_limit

    config = model_config_json(path) or {}
    layers = config.get("num_hidden_layers")
    return ModelShape(source, layers=layers if isinstance(layers, int) else None, positions=position_limit(config))


def built_shape(spec: Any, source: str) -> ModelShape:
    """The shape of the model a run's ``model`` block builds: its parameters, or a pretrained folder's config."""
    params = spec.block("model").params
    if hasattr(params, "num_layers"):
        return ModelShape(source, layers=params.num_layers, positions=getattr(params, "max_position_embeddings", None))
    path = getattr(params, "path", None)
    return folder_shape(path, source) if isinstance(path, str) else ModelShape(source)


def trained_shape(start: ModelShape, spec: Any, stage_name: str) -> ModelShape:
    """The final model of a stage that starts from ``start`` and trains ``spec``: the same shape, with the adapter
    its ``peft`` block trains (kept in ``final_model/adapter``)."""
    peft = spec.block("peft")
    return start.replace(source=f"the final model of stage '{stage_name}'", adapter=getattr(peft.params, "ADAPTER",
                                                                                            None),
                         adapter_name=peft.name)


def transformed_shape(transform: Any, start: ModelShape, path: str) -> ModelShape:
    """The model a transform makes from ``start``; its params' ``check_shape(shape, path)`` refuses a start it
    cannot transform and says what comes out.  A transform writes a plain model: no adapter is carried over."""
    check = getattr(transform.params, "check_shape", None)
    out = check(start, path) if check is not None else start
    return out.replace(source=f"{start.source} after transform {transform.name}", adapter=None, adapter_name=None)


def check_inherited(start: ModelShape, stage_name: str) -> None:
    """A stage that continues a model without a transform: a prompt-learning adapter (prefixes) leaves a frozen base
    that is not the trained model, so there is nothing to continue from."""
    from effitrain.registry import ConfigError

    if start.adapter == PROMPT:
        raise ConfigError(f"stages.{stage_name}.init: {start.source} is the frozen base of a {start.adapter_name} "
                          f"adapter, which cannot be merged into weights; a stage cannot continue from it")
