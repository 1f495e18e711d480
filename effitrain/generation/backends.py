"""The generator backends: what answers a batch of prompts, behind one interface.

A :class:`Generator` takes :class:`Request` s (a prompt, the key that caches its answer, the request's own seed)
and yields ``(request, Answer)`` pairs in groups that are cached together (``answer``).  Each backend gets every
sampling parameter from the block and nothing from the checkpoint:

* ``transformers``: ``model.generate`` under the explicit GenerationConfig of
  :mod:`effitrain.objectives.generation` (the checkpoint's ``generation_config.json`` is swapped out for the call),
  ``batch_size`` prompts at a time, left-padded.  A batch is seeded from the keys of its requests, so it draws the
  same samples whenever it is sent again (a resumed stage re-forms the same batches);
* ``vllm``: ``vllm.LLM`` and ``SamplingParams`` (imported only here), one seed per request;
* ``openai``: ``POST {base_url}/completions`` (or ``/chat/completions``, ``api: chat``: the prompt as one user
  message) (:mod:`effitrain.generation.http`) from ``concurrency`` threads,
  one seed per request, which servers that honour ``seed`` (vLLM, SGLang) use to draw the same answer again.

Failures a retry may cure are retried ``retries`` times with doubling back-off; after that the stage stops with
:class:`~effitrain.errors.RunFailed` (one line) -- the answers already cached and the chunks already written stay.
"""

from __future__ import annotations

import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from effitrain.console import say
from effitrain.errors import RunFailed
from effitrain.generation.http import EndpointError, EndpointRefused, complete


@dataclass(frozen=True)
class Request:
    key: str      # what the answer is cached under: (backend, model, sampling, prompt)
    prompt: str
    seed: int     # the request's own seed, derived from the block's seed and the key


@dataclass(frozen=True)
class Answer:
    texts: tuple[str, ...]  # n samples
    tokens: int             # completion tokens of all samples (0 where the backend does not say)


def request_seed(seed: int, key: str) -> int:
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def content_fingerprint(folder: str) -> str:
    """What a model folder holds, not where it is: a copied model hits the same cache entries, an edited one misses.
    Files up to 64 MiB are hashed whole; larger ones (the weights of a big model) by size and their first and last
    4 MiB, which any retraining changes."""
    root = Path(folder)
    if not root.is_dir():
        return hashlib.sha256(f"id:{folder}".encode()).hexdigest()[:16]  # a hub id or a server's model name
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        size = path.stat().st_size
        h.update(f"{path.relative_to(root)}:{size}:".encode())
        with open(path, "rb") as f:
            if size <= 64 * 2**20:
                h.update(f.read())
            else:
                h.update(f.read(4 * 2**20))
                f.seek(size - 4 * 2**20)
                h.update(f.read())
    return h.hexdigest()[:16]


class Generator:
    backend = ""

    def __init__(self, params: Any, fingerprint: str) -> None:
        self.params = params
        self.fingerprint = fingerprint

    def cache_scope(self) -> dict[str, Any]:
        """Everything besides the prompt that decides an answer: the part of every request's key."""
        return {"backend": self.backend, "model": self.fingerprint, **self.params.sampling()}

    def request(self, prompt: str, attempt: int = 0) -> Request:
        """``attempt`` > 0: the same prompt asked again (a rollout's retry of an answer it could not use) under a
        key, and so a seed, of its own; the first try's key is the plain one."""
        scope: list[Any] = [self.cache_scope(), prompt] + ([attempt] if attempt else [])
        key = hashlib.sha256(json.dumps(scope, sort_keys=True).encode()).hexdigest()
        return Request(key, prompt, request_seed(self.params.seed, key))

    def answer(self, requests: list[Request], *, should_stop: Callable[[], bool] = lambda: False
               ) -> Iterator[list[tuple[Request, Answer]]]:
        """Groups of answered requests, each group to be cached at once (a batch of one ``generate`` call).  Once
        ``should_stop()`` is true (a signal), nothing new is started; what is in flight is still answered."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def _retrying(self, what: str, call: Callable[[], Any]) -> Any:
        delay = self.params.backoff_seconds
        for attempt in range(self.params.retries + 1):
            try:
                return call()
            except EndpointRefused as exc:
                raise RunFailed(f"generator: the endpoint refused {what} ({exc}); nothing will change on a retry")
            except (EndpointError, MalformedOutput) as exc:
                if attempt == self.params.retries:
                    raise RunFailed(f"generator: {what} failed {attempt + 1} time(s), the last: {exc}; the chunks "
                                    f"written and the answers cached are kept: run again with resume=auto") from None
                say(f"generator: {what} failed ({exc}); retry {attempt + 1}/{self.params.retries} in {delay:g} s",
                    err=True)
                time.sleep(delay)
                delay *= 2


class MalformedOutput(RuntimeError):
    """A backend's answer that is not what was asked for (the wrong number of samples)."""


def _cut_at_stop(text: str, stop: list[str]) -> str:
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


# ------------------------------------------------------------------------------------------------- transformers
class TransformersGenerator(Generator):
    backend = "transformers"

    def __init__(self, params: Any, model_path: str) -> None:
        super().__init__(params, content_fingerprint(model_path))
        self.model_path = model_path
        self.model: Any = None  # loaded at the first request: a stage whose answers are all cached loads nothing

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        params = self.params
        device = params.device if params.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = {"auto": torch.bfloat16 if device == "cuda" else torch.float32, "float32": torch.float32,
                 "bfloat16": torch.bfloat16, "float16": torch.float16}[params.dtype]
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.tokenizer.padding_side = "left"  # the new tokens of every row start at the same column
        # a prompt longer than the model's positions (less the new tokens) loses its start, never its end, where
        # the instruction's last words and the answer cue are
        self.tokenizer.truncation_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype).to(self.device).eval()
        self.max_positions = getattr(self.model.config, "max_position_embeddings", None)

    def answer(self, requests: list[Request], *, should_stop: Callable[[], bool] = lambda: False
               ) -> Iterator[list[tuple[Request, Answer]]]:
        if self.model is None:
            self._load()
        size = self.params.batch_size
        for start in range(0, len(requests), size):
            if should_stop():
                return
            batch = requests[start:start + size]
            yield self._retrying(f"a batch of {len(batch)} prompt(s)", lambda: self._generate(batch))

    def _generate(self, batch: list[Request]) -> list[tuple[Request, Answer]]:
        import torch

        from effitrain.objectives.generation import generate_plainly, plain_generation_config

        p = self.params
        limit = None if self.max_positions is None else max(1, self.max_positions - p.max_new_tokens)
        enc = self.tokenizer([r.prompt for r in batch], return_tensors="pt", padding=True, truncation=limit is not None,
                             max_length=limit)
        config = plain_generation_config(do_sample=p.temperature > 0, max_new_tokens=p.max_new_tokens,
                                         pad_token_id=self.tokenizer.pad_token_id,
                                         eos_token_id=self.tokenizer.eos_token_id, temperature=p.temperature or 1.0,
                                         top_p=p.top_p, top_k=p.top_k)
        config.num_return_sequences = p.n
        # the batch's draws depend on its members only: the same batch sent again draws the same samples
        torch.manual_seed(request_seed(p.seed, "".join(r.key for r in batch)))
        with torch.no_grad():
            out = generate_plainly(self.model, config, input_ids=enc["input_ids"].to(self.device),
                                   attention_mask=enc["attention_mask"].to(self.device))
        new = out[:, enc["input_ids"].shape[1]:].cpu()
        answers = []
        for i, request in enumerate(batch):
            texts, tokens = [], 0
            for row in new[i * p.n:(i + 1) * p.n]:
                ids = row.tolist()
                length = next((k + 1 for k, t in enumerate(ids) if t == self.tokenizer.eos_token_id), len(ids))
                tokens += length
                text = self.tokenizer.decode(ids[:length], skip_special_tokens=True)
                texts.append(_cut_at_stop(text, p.stop))
            answers.append((request, Answer(tuple(texts), tokens)))
        return answers


def build_transformers(params: Any, *, model_path: str) -> Generator:
    return TransformersGenerator(params, model_path)


# ------------------------------------------------------------------------------------------------------- vllm
class VllmGenerator(Generator):
    backend = "vllm"

    def __init__(self, params: Any, model_path: str) -> None:
        super().__init__(params, content_fingerprint(model_path))
        self.model_path = model_path
        self.llm: Any = None  # started at the first request, as the transformers model is loaded

    def _load(self) -> None:
        from vllm import LLM  # only here: vllm is an optional dependency, for GPU machines

        params = self.params
        kwargs = {"tensor_parallel_size": params.tensor_parallel_size,
                  "gpu_memory_utilization": params.gpu_memory_utilization, "dtype": params.dtype,
                  # the checkpoint's generation_config.json must not fill sampling defaults in (vLLM reads it
                  # unless told otherwise): every parameter comes from the block
                  "generation_config": "vllm", "seed": params.seed}
        if params.max_model_len is not None:
            kwargs["max_model_len"] = params.max_model_len
        self.llm = LLM(model=self.model_path, **kwargs)

    def answer(self, requests: list[Request], *, should_stop: Callable[[], bool] = lambda: False
               ) -> Iterator[list[tuple[Request, Answer]]]:
        from vllm import SamplingParams

        if self.llm is None:
            self._load()
        p = self.params
        size = max(p.batch_size, 1) * 8  # vLLM schedules its own batches; this only bounds what one call holds
        for start in range(0, len(requests), size):
            if should_stop():
                return
            part = requests[start:start + size]
            sampling = [SamplingParams(n=p.n, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k or -1,
                                       max_tokens=p.max_new_tokens, seed=r.seed, stop=list(p.stop) or None,
                                       repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
                                       min_p=0.0) for r in part]

            def run() -> list[tuple[Request, Answer]]:
                outputs = self.llm.generate([r.prompt for r in part], sampling, use_tqdm=False)
                answers = []
                for request, output in zip(part, outputs):
                    if len(output.outputs) != p.n:
                        raise MalformedOutput(f"vLLM returned {len(output.outputs)} sample(s), not {p.n}")
                    answers.append((request, Answer(tuple(o.text for o in output.outputs),
                                                    sum(len(o.token_ids) for o in output.outputs))))
                return answers

            yield self._retrying(f"{len(part)} prompt(s)", run)


def build_vllm(params: Any, *, model_path: str) -> Generator:
    return VllmGenerator(params, model_path)


# ----------------------------------------------------------------------------------------------------- openai
class OpenAIGenerator(Generator):
    backend = "openai"

    def __init__(self, params: Any, key_path: str = "generator") -> None:
        # the served model's name is its identity here: the server's weights are not ours to hash
        super().__init__(params, f"{params.base_url.rstrip('/')}#{params.model}")
        self.key = params.api_key(key_path)

    def cache_scope(self) -> dict[str, Any]:
        scope = super().cache_scope()
        if self.params.api != "completions":  # a chat template around the prompt makes another answer
            scope["api"] = self.params.api
        return scope

    def _one(self, request: Request) -> Answer:
        p = self.params
        chat = p.api == "chat"
        asked = {"messages": [{"role": "user", "content": request.prompt}]} if chat else {"prompt": request.prompt}
        body = {"model": p.model, **asked, "max_tokens": p.max_new_tokens,
                "temperature": p.temperature, "top_p": p.top_p, "n": p.n, "seed": request.seed,
                # sent explicitly so that a server's own defaults (vLLM reads generation_config.json) add nothing
                "frequency_penalty": 0.0, "presence_penalty": 0.0}
        if p.top_k:
            body["top_k"] = p.top_k  # an extension that vLLM, SGLang and TGI accept
        if p.stop:
            body["stop"] = list(p.stop)
        pairs = self._retrying("a request to " + p.base_url,
                               lambda: complete(p.base_url, self.key, body, timeout=p.timeout_seconds, n=p.n,
                                                        chat=chat))
        return Answer(tuple(_cut_at_stop(t, p.stop) for t, _ in pairs), sum(k for _, k in pairs))

    def answer(self, requests: list[Request], *, should_stop: Callable[[], bool] = lambda: False
               ) -> Iterator[list[tuple[Request, Answer]]]:
        from concurrent.futures import as_completed

        failed: Optional[BaseException] = None
        with ThreadPoolExecutor(max_workers=self.params.concurrency) as pool:
            futures = {pool.submit(self._one, r): r for r in requests}
            try:
                # as they finish: every answer is cached the moment it arrives, so a request that fails for good
                # loses none of the others in flight (a resumed stage sends only what was never answered)
                for future in as_completed(futures):
                    if should_stop():  # a signal: send nothing new, but keep the answers already on their way
                        for other in futures:
                            other.cancel()
                    if future.cancelled():  # never sent (a request before it failed for good, or a signal)
                        continue
                    try:
                        yield [(futures[future], future.result())]
                    except RunFailed as exc:
                        failed = failed or exc
                        for other in futures:
                            other.cancel()  # not started yet: not sent at all
            finally:
                for other in futures:
                    other.cancel()
        if failed is not None:
            raise failed


def build_openai(params: Any, *, model_path: Optional[str] = None) -> Generator:
    return OpenAIGenerator(params)

