"""Chat and preference datasets (conversations as ``messages`` lists): the built-in arithmetic instructions and
local JSONL files.  Rows are whole conversations with labels on the assistant tokens only (effitrain.data.chat)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

from effitrain.config.rules import rule
from effitrain.registry import ConfigError, param, register


@dataclass
class _ChatCommon:
    format: Literal["chat", "preference", "prompts"] = param(
        "chat", help="chat: packed conversations for sft; preference: (chosen, rejected) pairs for dpo / simpo; "
                     "prompts: one conversation a row, its first assistant message the reference answer, for grpo")
    seq_len: int = param(128, ge=8, help="tokens per row (packed conversations, or each side of a pair)")
    eval_examples_per_domain: int = param(64, ge=1, help="held-out conversations per domain")
    packing: Literal["in_order", "dynamic"] = param(
        "in_order", help="format=chat training rows: in_order fills rows in the data's order; dynamic packs longest "
                         "first into the first row with room (CodeACT's Dynamic Pack: fewer pad tokens)")

    def validate(self, path: str) -> None:
        # pairs and prompts are one conversation a row: there is nothing to pack, so the setting would do nothing
        if self.packing != "in_order" and self.format != "chat":
            raise ConfigError(f"{path}.packing: '{self.packing}' packs training conversations (format=chat); "
                              f"format={self.format} keeps one a row, so use {path}.packing=in_order")


@register("dataset", "chat_demo", builder="effitrain.data.chat_sources:build_chat_demo",
          summary="Built-in instructions: procedural arithmetic with checkable answers (a wrong answer as rejected)")
@dataclass
class ChatDemoParams(_ChatCommon):
    max_docs_per_domain: int = param(4000, ge=1, help="generated training conversations (one domain)")
    max_digits: int = param(2, ge=1, le=6, help="operands have 1..max_digits digits")
    answer_style: Literal["plain", "think_boxed", "sentence", "plain_or_sentence", "thinkless"] = param(
        "plain", help="plain: '82'; think_boxed: '<think>37+45</think> \\boxed{82}' (the format the format and "
                      "length rewards check); sentence: 'The answer is 82.'; plain_or_sentence: either, drawn per "
                      "example (a model that answers in both styles at random: what sami teaches to follow a "
                      "constitution); thinkless: each question twice, '<think>37+45: 37+40=77, "
                      "77+5=82</think> \\boxed{82}' and '<short>\\boxed{82}', with <think> and <short> added to "
                      "the tokenizer (Thinkless's warm-up pairs)")
    domain_by: Literal["one", "operation", "digits", "operation_digits"] = param(
        "one", help="the domains (data distributions) of the questions: one ('arithmetic_chat'), by operation "
                    "(add, sub, mul), by the digits of the longer operand (1d, 2d, ...: difficulty) or by both "
                    "(add_2d, ...); a per-domain curriculum (mixture, skill_it, dump) draws over them")
    seed: int = 0


@register("dataset", "chat_local", builder="effitrain.data.chat_sources:build_chat_local",
          summary="Conversations from local JSONL: a messages list per line, or chosen/rejected lists")
@dataclass
class ChatLocalParams(_ChatCommon):
    path: Union[str, list[str]] = param(default_factory=list, help="a .jsonl file or glob, or a list")
    eval_path: Optional[Union[str, list[str]]] = None
    messages_field: str = param("messages", help="format=chat: the field with the [{role, content}] list")
    chosen_field: str = param("chosen", help="format=preference: the chosen conversation")
    rejected_field: str = param("rejected", help="format=preference: the rejected conversation (same prompt)")
    domain_field: Optional[str] = param(None, help="field with a domain label; null = one domain 'all'")

    def __post_init__(self) -> None:
        if isinstance(self.path, str):
            self.path = [self.path]
        if isinstance(self.eval_path, str):
            self.eval_path = [self.eval_path]

    def validate(self, path: str) -> None:
        super().validate(path)
        if not self.path or any(not p.strip() for p in self.path):
            raise ConfigError(f"{path}.path: dataset=chat_local needs files; set {path}.path=FILE.jsonl")

    def check_inputs(self, path: str, *, spec, deep: bool):
        """The files, read through as the builder reads them (``effitrain check``; a launch when they are small):
        returns what was found (its domains), or None."""
        from effitrain.config.inputs import note_read
        from effitrain.data.chat_records import check_chat_local

        inv = check_chat_local(self, spec=spec, deep=deep, key=path)
        if inv is not None:
            note_read(f"{path}.path: {inv.records:,} {self.format} records in {len(inv.domains)} domain(s)")
        return inv


@register("dataset", "chat_hub", builder="effitrain.data.chat_sources:build_chat_hub",
          summary="Conversations from a Hugging Face dataset (hub id or local folder): messages or chosen/rejected")
@dataclass(kw_only=True)
class ChatHubParams(_ChatCommon):
    path: str = param(help="dataset id, e.g. 'allenai/tulu-3-sft-mixture', or a local dataset folder")
    config_name: Optional[str] = None
    split: str = "train"
    eval_split: Optional[str] = param(None, help="the source's eval split; null = hold out conversations of split")
    revision: Optional[str] = None
    messages_field: str = param("messages", help="format=chat: the field with the [{role, content}] list")
    chosen_field: str = param("chosen", help="format=preference: the chosen conversation")
    rejected_field: str = param("rejected", help="format=preference: the rejected conversation (same prompt)")
    domain_field: Optional[str] = param(None, help="field with a domain label; null = one domain 'all'")

_PAIR_OBJECTIVES = ("dpo", "simpo")
#: objectives that sample answers to prompts (format=prompts)
_PROMPT_OBJECTIVES = ("grpo", "sami")
#: objectives that train on the assistant tokens of conversations (format=chat)
_CONVERSATION_OBJECTIVES = ("sft", "lssd")


@rule("objective_matches_chat_format", "objective sft needs conversations (a chat dataset with format=chat); dpo "
                                       "and simpo need pairs (format=preference), grpo and sami prompts (format=prompts); "
                                       "no other objective reads pairs or prompts")
def _objective_matches_format(spec, env) -> Optional[str]:
    objective = spec.block("objective")
    if objective.name == "mixed":  # its components on the stage's batches decide; its own streams: at check_inputs
        name = objective.params.stage_objective
        return chat_format_problem(name, spec.block("dataset")) if name is not None else None
    return chat_format_problem(objective.name, spec.block("dataset"))


def chat_format_problem(objective: str, data: Any) -> Optional[str]:
    """Why ``objective`` cannot train on the rows of the dataset block ``data`` (None when it can)."""
    fmt = getattr(data.params, "format", None) if data.name.startswith("chat_") else None
    if objective in _PAIR_OBJECTIVES and fmt != "preference":
        return (f"objective={objective} trains on (chosen, rejected) pairs; use a chat dataset with "
                f"dataset.format=preference (e.g. dataset=chat_demo dataset.format=preference)")
    if fmt == "preference" and objective not in _PAIR_OBJECTIVES:
        return (f"dataset.format=preference makes (chosen, rejected) pairs, which objective={objective} would train "
                f"on alike; use objective=dpo or objective=simpo, or dataset.format=chat")
    if objective in _PROMPT_OBJECTIVES and fmt != "prompts":
        return (f"objective={objective} samples answers to prompts; use a chat dataset with dataset.format=prompts "
                f"(e.g. dataset=chat_demo dataset.format=prompts)")
    if fmt == "prompts" and objective not in _PROMPT_OBJECTIVES:
        return (f"dataset.format=prompts keeps one conversation a row for sampling, which objective={objective} does "
                f"not do; use objective=grpo or objective=sami, or dataset.format=chat")
    if objective in _CONVERSATION_OBJECTIVES and fmt != "chat":
        return (f"objective={objective} trains on the assistant tokens of conversations; use a chat dataset "
                f"(dataset=chat_demo or dataset=chat_local)")
    return None
