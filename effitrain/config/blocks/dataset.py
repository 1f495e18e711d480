"""Dataset block: a `datasets` source with a `domain` column, tokenized and packed to `seq_len`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from effitrain.registry import param, register


@dataclass
class _Common:
    seq_len: int = param(128, ge=8, help="tokens per packed training sequence")
    eval_examples_per_domain: int = param(64, ge=1, help="held-out documents per domain (when the source has no eval split)")
    domains: Optional[list[str]] = param(None, help="keep only these domains (null = all)")
    num_proc: int = param(1, ge=1, help="worker processes for datasets.map")


@register("dataset", "demo", builder="effitrain.data.build:build_demo",
          summary="Built-in corpus made from the Python install: docs prose, stdlib code, arithmetic")
@dataclass
class DemoParams(_Common):
    max_docs_per_domain: int = param(2000, ge=10)
    seed: int = 0


@register("dataset", "local", builder="effitrain.data.build:build_local",
          summary="Local jsonl / json / parquet / txt files (one file, a glob, or a list)")
@dataclass
class LocalParams(_Common):
    path: Union[str, list[str]] = param(default_factory=list, help="a file or glob, or a list; format by extension")
    eval_path: Optional[Union[str, list[str]]] = None
    text_field: str = "text"
    domain_field: Optional[str] = param(None, help="column with a domain label; null = one domain 'all'")

    def __post_init__(self) -> None:  # one file on the command line (dataset.path=x.jsonl) is a list of one
        if isinstance(self.path, str):
            self.path = [self.path]
        if isinstance(self.eval_path, str):
            self.eval_path = [self.eval_path]


@register("dataset", "hub", builder="effitrain.data.build:build_hub",
          summary="A dataset from the Hugging Face hub (or its local cache), by id")
@dataclass(kw_only=True)
class HubParams(_Common):
    path: str = param(help="dataset id, e.g. 'roneneldan/TinyStories'")
    config_name: Optional[str] = None
    split: str = "train"
    eval_split: Optional[str] = None
    text_field: str = "text"
    domain_field: Optional[str] = None
    revision: Optional[str] = None
