"""The ``generator`` block: a language model that answers prompts, for the stages that make data with one.

``backend`` picks the engine (the registry entry): ``transformers`` (the default; ``model.generate`` in this
process, CPU or GPU), ``vllm`` (the vLLM engine in this process, on a GPU) or ``openai`` (any OpenAI-compatible
endpoint: a vLLM or SGLang server, TGI, a hosted API).  Every sampling parameter is explicit and sent as given: no
backend fills a missing one from the checkpoint's ``generation_config.json`` (a repetition penalty the config does
not name would change the distribution the data is drawn from).

A generator builder is called as ``build(params, *, model_path)`` (``model_path``: ``model`` with ``@stage:NAME``
and a run directory resolved to the model folder) and returns a :class:`effitrain.generation.backends.Generator`.
Torch-free here; the ``check_inputs`` methods are what ``effitrain check`` runs (one line, exit 2).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from effitrain.registry import REGISTRY, ConfigError, choices_text, param, register

STAGE_REF = "@stage:"  # as effitrain.config.stages (which imports the blocks: the constant is repeated, not imported)
DEFAULT_BACKEND = "transformers"


@dataclass(kw_only=True)
class _Sampling:
    model: str = param(help="a save_pretrained folder, a run directory (its final_model), or '@stage:NAME' (an "
                            "earlier stage's final model); openai: the model id the server serves")
    temperature: float = param(1.0, ge=0, help="0 = greedy decoding")
    top_p: float = param(1.0, gt=0, le=1, help="nucleus sampling (1 = off)")
    top_k: int = param(0, ge=0, help="sample among the k likeliest tokens (0 = off)")
    max_new_tokens: int = param(256, ge=1, help="tokens generated per sample at most")
    seed: int = param(0, help="the seed every request's own seed is derived from (with the request's key)")
    n: int = param(1, ge=1, help="samples per prompt")
    stop: list[str] = param(default_factory=list, help="strings that end a sample (cut before them)")
    batch_size: int = param(8, ge=1, help="prompts per model.generate call (transformers) / per request round")
    retries: int = param(3, ge=0, help="tries after the first that fail (a dropped connection, a 5xx, a malformed "
                                       "answer) before the stage stops with the error")
    backoff_seconds: float = param(1.0, ge=0, help="wait before the first retry; doubled before each next one")

    def sampling(self) -> dict[str, Any]:
        """What decides the samples besides the model and the prompt (a part of every request's cache key)."""
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "max_new_tokens": self.max_new_tokens, "seed": self.seed, "n": self.n, "stop": list(self.stop)}

    def check_model(self, path: str, *, need_tokenizer: bool = True) -> None:
        """The model folder (or a run directory with a final_model) exists and loads; '@stage:NAME' is written by
        an earlier stage, so it is checked when that stage finished."""
        if self.model.startswith(STAGE_REF) or self.model.startswith("<"):  # a placeholder of an earlier stage
            return
        from effitrain.config.inputs import check_model_folder

        check_model_folder(f"{path}.model", model_folder(self.model), revision=None, need_tokenizer=need_tokenizer)


def model_folder(model: str) -> str:
    """A run directory stands for its final model; anything else is the folder (or hub id) itself."""
    run_final = Path(model).expanduser() / "final_model"
    if (run_final / "config.json").is_file() and not (Path(model).expanduser() / "config.json").is_file():
        return str(run_final)
    return model


@register("generator", "transformers", builder="effitrain.generation.backends:build_transformers",
          summary="model.generate in this process (CPU or GPU), batched, with an explicit GenerationConfig")
@dataclass(kw_only=True)
class TransformersGeneratorParams(_Sampling):
    device: Literal["auto", "cpu", "cuda"] = param("auto", help="auto: the GPU when there is one")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = param("auto", help="auto: bfloat16 on a GPU, "
                                                                                  "float32 on the CPU")

    def check_inputs(self, path: str, *, spec: Any = None, deep: bool = False) -> None:
        self.check_model(path)


@register("generator", "vllm", builder="effitrain.generation.backends:build_vllm",
          summary="the vLLM engine in this process, on a GPU (vllm.LLM, SamplingParams)")
@dataclass(kw_only=True)
class VllmGeneratorParams(_Sampling):
    tensor_parallel_size: int = param(1, ge=1, help="GPUs the engine shards the model over")
    gpu_memory_utilization: float = param(0.85, gt=0, le=1, help="share of the GPU's memory vLLM may take")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_model_len: Optional[int] = param(None, ge=16, help="the engine's context length (null: the model's)")

    def check_inputs(self, path: str, *, spec: Any = None, deep: bool = False) -> None:
        from effitrain.config.inputs import package_available

        if not package_available("vllm"):
            raise ConfigError(f"{path}.backend: vllm is not installed (pip install vllm, on a machine with a GPU); "
                              f"use backend: transformers, or openai with a vLLM server's base_url")
        if not _gpu_count():
            raise ConfigError(f"{path}.backend: vllm runs on a GPU and this machine has none; use backend: "
                              f"transformers, or openai with the base_url of a server that has one")
        if _gpu_count() < self.tensor_parallel_size:
            raise ConfigError(f"{path}.tensor_parallel_size: {self.tensor_parallel_size} GPUs asked, "
                              f"{_gpu_count()} present")
        self.check_model(path)


def _gpu_count() -> int:
    """GPUs visible to this process, without importing torch (vllm imports it anyway, but check must be fast)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and not visible.strip():
        return 0
    devices = [d for d in os.listdir("/dev") if d.startswith("nvidia") and d[6:].isdigit()] \
        if os.path.isdir("/dev") else []
    if visible is not None:
        return min(len(devices), len([v for v in visible.split(",") if v.strip()]))
    return len(devices)


@register("generator", "openai", builder="effitrain.generation.backends:build_openai",
          summary="an OpenAI-compatible endpoint (/v1/completions or /v1/chat/completions): a vLLM/SGLang server, "
                  "TGI, a hosted API")
@dataclass(kw_only=True)
class OpenAIGeneratorParams(_Sampling):
    base_url: str = param(help="the API root, e.g. http://localhost:8000/v1 (its /models and /completions are used)")
    api: Literal["completions", "chat"] = param("completions", help="completions: the prompt as it is; chat: the "
                                                "prompt as one user message to /chat/completions (the server applies "
                                                "the model's chat template; hosted chat-only models)")
    api_key_env: Optional[str] = param(None, help="the NAME of the environment variable that holds the key (the "
                                                  "key itself never goes in a config); null: no key is sent")
    concurrency: int = param(8, ge=1, help="requests in flight at once")
    timeout_seconds: float = param(120.0, gt=0, help="one request's limit before it counts as failed")
    probe_seconds: float = param(5.0, gt=0, help="how long `check` waits for base_url/models")

    def validate(self, path: str) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"{path}.base_url: expected an http:// or https:// URL, got {self.base_url!r}")
        if self.api_key_env is not None and (not self.api_key_env or not self.api_key_env.replace("_", "a").isalnum()):
            raise ConfigError(f"{path}.api_key_env: expected the name of an environment variable (e.g. "
                              f"OPENAI_API_KEY), got {self.api_key_env!r}; the key itself never goes in a config")

    def api_key(self, path: str) -> Optional[str]:
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise ConfigError(f"{path}.api_key_env: the environment variable {self.api_key_env} is not set (or "
                              f"empty); export it with the endpoint's key, or set api_key_env: null for a server "
                              f"without one")
        return key

    def check_inputs(self, path: str, *, spec: Any = None, deep: bool = False) -> None:
        """The key variable is set and the endpoint answers ``GET base_url/models`` within ``probe_seconds``."""
        key = self.api_key(path)
        from effitrain.generation.http import probe_models  # standard library only

        probe_models(self.base_url, key, timeout=self.probe_seconds, key_path=f"{path}.base_url")


def parse_generator(raw: Any, path: str) -> Any:
    """The validated generator block: ``backend`` names the registry entry (``transformers`` when absent)."""
    from effitrain.registry import _is_mapping

    if not _is_mapping(raw):
        raise ConfigError(f"{path}: expected a mapping with a backend ({choices_text(REGISTRY.names('generator'))}) "
                          f"and a model, got {raw!r}")
    body = dict(raw)
    if "name" in body:
        raise ConfigError(f"{path}.name: a generator names its engine with 'backend' (valid: "
                          f"{choices_text(REGISTRY.names('generator'))})")
    body["name"] = body.pop("backend", DEFAULT_BACKEND)
    try:
        return REGISTRY.parse("generator", body, path)
    except ConfigError as exc:  # the registry says '.name'; the user wrote 'backend'
        raise ConfigError(str(exc).replace(f"{path}.name:", f"{path}.backend:")) from None
