"""Dataset block: a `datasets` source with a `domain` column, tokenized and packed to `seq_len`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

from effitrain.config.blocks.dataset_control import ControlTokensParams
from effitrain.config.rules import rule
from effitrain.registry import ConfigError, param, register


@dataclass
class _Common:
    seq_len: int = param(128, ge=8, help="tokens per packed training sequence")
    eval_examples_per_domain: int = param(64, ge=1, help="held-out documents per domain (when the source has no eval split)")
    domains: Optional[list[str]] = param(None, help="keep only these domains (null = all)")
    num_proc: int = param(1, ge=1, help="worker processes for datasets.map")
    # how training documents become rows (evaluation always uses concatenate-and-chunk rows of seq_len)
    packing: Literal["concatenate", "decompose"] = param(
        "concatenate", help="concatenate: documents joined and cut into seq_len rows; decompose: each document cut "
                            "alone into power-of-two pieces (dataset decomposition; needs curriculum: "
                            "dataset_decomposition)")
    min_piece_len: int = param(8, ge=1, help="packing=decompose: the shortest bucket (a power of two); shorter "
                                             "remainders of a document are dropped")
    # generated formal-language documents added to the train split as domain 'procedural' (pre-pretraining)
    procedural_docs: int = param(0, ge=0, help="generated documents added to the train split (0 = none)")
    procedural_language: Literal["shuffle_dyck", "dyck", "copy"] = param("shuffle_dyck",
                                                                          help="the formal language generated")
    procedural_symbols: int = param(64, ge=1, help="bracket types / alphabet size (k)")
    procedural_length: int = param(256, ge=2, help="symbols per generated document")
    procedural_seed: int = 0
    # documents made by a model: a synthesis stage's dataset ('@stage:NAME') or a jsonl file of {text, domain}
    synthetic: list[str] = param(default_factory=list, help="jsonl files of model-made documents (a synthesis "
                                 "stage's dataset: '@stage:NAME') joined to the train split with their own domains; "
                                 "the tokenizer and the eval split stay the real data's")
    # conditional training: a control token before every segment of the training documents (dataset_control.py)
    control_tokens: Optional[ControlTokensParams] = param(None, help="{scorer, threshold | bad_fraction, segment, "
                                                                     "drop_token_fraction, ...}; null = none")

    def validate(self, path: str) -> None:
        if self.packing == "decompose":
            for key, value in (("seq_len", self.seq_len), ("min_piece_len", self.min_piece_len)):
                if value & (value - 1):
                    raise ConfigError(f"{path}.{key}: packing=decompose needs a power of two, got {value}")
            if self.min_piece_len > self.seq_len:
                raise ConfigError(f"{path}.min_piece_len: {self.min_piece_len} is longer than seq_len={self.seq_len}")


@register("dataset", "demo", builder="effitrain.data.build:build_demo",
          summary="Built-in corpus made from the Python install: docs prose, stdlib code, arithmetic")
@dataclass
class DemoParams(_Common):
    max_docs_per_domain: int = param(2000, ge=10)
    seed: int = 0

    def validate(self, path: str) -> None:
        super().validate(path)
        from effitrain.data.demo import DEMO_DOMAINS  # standard library only
        from effitrain.registry import choices_text, did_you_mean

        for d in self.domains or []:
            if d not in DEMO_DOMAINS:
                raise ConfigError(f"{path}.domains: unknown domain '{d}'{did_you_mean(d, DEMO_DOMAINS)}; "
                                  f"valid: {choices_text(DEMO_DOMAINS)}")
        if self.domains is not None and not self.domains:
            raise ConfigError(f"{path}.domains: an empty list keeps nothing; give domains or null for all")

    def check_inputs(self, path: str, *, spec, deep: bool) -> "DemoDomains":
        """The built-in corpus's domains are known without reading it: returned, so that ``check`` refuses a
        domain another block names (a selection's ``domains``, a curriculum's order) that the corpus lacks."""
        from effitrain.data.demo import DEMO_DOMAINS  # standard library only

        return DemoDomains(list(DEMO_DOMAINS))


@dataclass
class DemoDomains:
    domains: list[str]


@register("dataset", "local", builder="effitrain.data.build:build_local",
          summary="Local jsonl / json / parquet / txt files (one file, a glob, or a list)")
@dataclass
class LocalParams(_Common):
    path: Union[str, list[str]] = param(default_factory=list, help="a file or glob, or a list; format by extension")
    eval_path: Optional[Union[str, list[str]]] = None
    text_field: str = "text"
    domain_field: Optional[str] = param(None, help="column with a domain label; null = one domain 'all'")
    # What one document is in a .txt file: a paragraph (blank-line separated), a line, or the whole file.
    txt_split: Literal["blank_line", "line", "file"] = "blank_line"

    def __post_init__(self) -> None:  # one file on the command line (dataset.path=x.jsonl) is a list of one
        if isinstance(self.path, str):
            self.path = [self.path]
        if isinstance(self.eval_path, str):
            self.eval_path = [self.eval_path]

    def validate(self, path: str) -> None:
        super().validate(path)
        if not self.path or any(not p.strip() for p in self.path):
            raise ConfigError(f"{path}.path: dataset=local needs files; set {path}.path=FILE (a .jsonl, .json, "
                              f".parquet or .txt file, a glob, or a list of them)")
        if self.eval_path is not None and (not self.eval_path or any(not p.strip() for p in self.eval_path)):
            raise ConfigError(f"{path}.eval_path: an empty path; give eval files or null to hold out documents")

    def check_inputs(self, path: str, *, spec, deep: bool):
        """The files, read through where ``deep`` or small: returns what was found (its domains), or None."""
        import os

        from effitrain.data.inspect import check_enough_for_a_batch, check_local

        inv = check_local(self, deep=deep, key=path)
        if inv is not None:
            from effitrain.config.inputs import note_read

            note_read(f"{path}.path: {inv.documents:,} documents in {len(inv.domains)} domain(s), at most "
                      f"{sum(inv.domain_tokens_max.values()):,} tokens (one per byte of text)"
                      + (f"; {inv.blank_text:,} blank rows skipped" if inv.blank_text else ""))
        if inv is not None and getattr(spec.blocks["model"].params, "tokenizer", None) == "bpe":
            t = spec.train
            world = int(os.environ["WORLD_SIZE"]) if os.environ.get("WORLD_SIZE", "").isdigit() else 1
            check_enough_for_a_batch(inv, seq_len=self.seq_len, global_batch=t.micro_batch_size * t.grad_accum * world,
                                     domains=self.domains, key=path)
        return inv


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

    def check_inputs(self, path: str, *, spec, deep: bool) -> None:
        from effitrain.config.inputs import offline

        if not deep or not offline() or self.path.startswith(("/", ".", "~")):
            return  # online, the hub answers at launch; a local folder is read by `datasets` itself
        try:
            import datasets

            datasets.load_dataset_builder(self.path, self.config_name, revision=self.revision)
        except Exception as exc:  # noqa: BLE001 - offline, `datasets` only looks in its cache: any failure is "absent"
            raise ConfigError(f"{path}.path: '{self.path}' is not in the local Hugging Face cache and downloads "
                              f"are off (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE; {type(exc).__name__}); download it "
                              f"where there is network, or use dataset=local dataset.path=FILE") from None


@rule("seq_len_within_positions",
      "dataset.seq_len (+ prefix-tuning tokens) must not exceed the model's position limit "
      "(max_position_embeddings or the pretrained config's)")
def _seq_len_within_positions(spec, env):
    seq_len = spec.blocks["dataset"].params.seq_len
    model = spec.blocks["model"]
    limit = getattr(model.params, "max_position_embeddings", None)
    source = "model.max_position_embeddings"
    if limit is None and isinstance(getattr(model.params, "path", None), str):
        from effitrain.config.inputs import model_config_json, position_limit

        config = model_config_json(model.params.path, getattr(model.params, "revision", None))
        limit = position_limit(config) if config else None
        source = f"the position limit in {model.params.path}/config.json"
        inherited = getattr(spec, "start_shape", None)  # a stage's model that an earlier stage will write
        if limit is None and inherited is not None and inherited.positions is not None:
            limit, source = inherited.positions, f"the position limit of {inherited.source}"
    # peft prefix tuning feeds its virtual tokens as a past: the sequence's positions start after them
    prefix = getattr(spec.blocks["peft"].params, "num_virtual_tokens", 0) if spec.blocks["peft"].name == "prefix" else 0
    if isinstance(limit, int) and seq_len + prefix > limit:
        used = f"dataset.seq_len={seq_len}" + (f" + peft.num_virtual_tokens={prefix}" if prefix else "")
        return (f"{used} is longer than {source} ({limit}); lower dataset.seq_len to at most {limit - prefix}"
                + (" or raise model.max_position_embeddings" if source.startswith("model.") else ""))
    return None
