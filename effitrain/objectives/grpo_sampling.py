"""Where GRPO's completions come from: ``objective.grpo.generator`` (a generator block; ``backend`` picks one).

* ``transformers`` (the default): ``model.generate`` on the policy itself, in this process, exactly as GRPO
  always sampled (:class:`PolicyGenerate`): the prompts repeated G times, one call under the explicit
  GenerationConfig of :mod:`effitrain.objectives.generation`, seeded inside a forked RNG.
* ``vllm``: a vLLM engine in this process beside the policy on the same GPU (TRL's ``vllm_mode="colocate"``,
  ``trl/generation/vllm_generation.py`` of TRL 1.16: ``LLM(..., distributed_executor_backend="external_launcher")``
  and ``load_weights`` on the engine's model) (:class:`ColocatedVllm`).  The engine is given the prompts as token
  ids and returns token ids, so no text round trip can change a prompt; it starts from a copy of the policy saved
  when it is first asked, and after every optimizer step the policy's weights are pushed into it by an engine
  event hook (:class:`PushWeights`, ``step_end``), so every batch is sampled by the policy of that moment.  The
  engine's own log-probabilities are never used: GRPO recomputes every log-probability with the policy (the
  update is exactly the one the ``transformers`` path takes, up to which completions were drawn).

``openai`` is refused for GRPO when the config is checked: a remote server's weights cannot follow the policy.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Any, Iterator, Optional, Sequence

import torch

from effitrain.engine.events import Hook
from effitrain.objectives.generation import generate_plainly, plain_generation_config


@contextlib.contextmanager
def seeded(seed: int, device: torch.device):
    """``torch.manual_seed(seed)`` inside a forked RNG: the run's global stream is untouched by sampling."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class PolicyGenerate:
    """``backend: transformers``: the policy's own ``generate``."""

    hooks: tuple = ()  # the policy samples itself: nothing to keep in step

    def __init__(self, tokenizer: Any, *, group_size: int, max_new_tokens: int, temperature: float) -> None:
        self.tokenizer, self.group_size = tokenizer, group_size
        self.max_new_tokens, self.temperature = max_new_tokens, temperature

    @torch.no_grad()
    def sample(self, module: Any, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, seed: int) -> torch.Tensor:
        ids = prompt_ids.repeat_interleave(self.group_size, dim=0)
        mask = prompt_mask.repeat_interleave(self.group_size, dim=0)
        was_training = module.training
        module.eval()  # sample from the policy itself: no dropout
        try:
            config = plain_generation_config(do_sample=True, temperature=self.temperature,
                                             max_new_tokens=self.max_new_tokens,
                                             pad_token_id=self.tokenizer.pad_token_id,
                                             eos_token_id=self.tokenizer.eos_token_id)
            with seeded(seed, ids.device):
                out = generate_plainly(module, config, input_ids=ids, attention_mask=mask)
        finally:
            module.train(was_training)
        return out[:, ids.shape[1]:]


def unpadded(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> list[list[int]]:
    """The left-padded prompts as token-id lists without their padding (what the engine is given)."""
    return [[t for t, m in zip(row, keep) if m] for row, keep in zip(prompt_ids.tolist(), prompt_mask.tolist())]


def completion_tensor(token_ids: Sequence[Sequence[int]], pad_id: int, device: Any) -> torch.Tensor:
    """``[N * G, C]`` completions from the engine's token-id lists (group after group, as it returns them),
    right-padded with ``pad_id`` to the longest (``model.generate``'s layout: what follows the first EOS is not
    scored, :func:`effitrain.objectives.grpo.completion_mask`)."""
    width = max((len(t) for t in token_ids), default=0)
    width = max(width, 1)
    return torch.tensor([list(t) + [pad_id] * (width - len(t)) for t in token_ids], dtype=torch.long,
                        device=device)


@contextlib.contextmanager
def merged_for_inference(module: Any) -> Iterator[Any]:
    """The module with its LoRA adapters merged into the base weights for the duration (PEFT), unmerged after:
    the engine serves a plain model of the base architecture."""
    merge = getattr(module, "merge_adapter", None)
    if merge is None:
        yield module
        return
    merge()
    try:
        yield module
    finally:
        module.unmerge_adapter()


def engine_weights(module: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of the policy under the names of the plain base model (what vLLM's ``load_weights``
    expects): a PEFT model's ``base_model.model.`` prefix and ``.base_layer`` dropped, its adapter tensors (merged
    already) and ``modules_to_save``' originals skipped -- as TRL's ``_iter_named_params``.  Call it inside
    :func:`merged_for_inference`."""
    prefix = getattr(module, "prefix", None)  # PEFT's adapter name part, e.g. "lora_"
    is_peft = hasattr(module, "merge_adapter")
    for name, param in module.named_parameters():
        if is_peft:
            name = name.removeprefix("base_model.model.").replace(".base_layer", "")
            if prefix and prefix in name:
                continue
            if "original_module" in name:
                continue
            name = name.replace("modules_to_save.default.", "")
        yield name, param.data


class ColocatedVllm:
    """``backend: vllm``: a vLLM engine in this process, fed token ids, kept at the policy's weights."""

    def __init__(self, tokenizer: Any, params: Any, *, group_size: int, max_new_tokens: int, temperature: float,
                 rank: int = 0, world_size: int = 1) -> None:
        self.tokenizer, self.params, self.group_size = tokenizer, params, group_size
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.rank, self.world_size = rank, world_size
        self.llm: Any = None           # started when first asked, from the policy of that moment
        self._folder: Optional[tempfile.TemporaryDirectory] = None
        self.pushes = 0                # weight pushes so far (logged; a test reads it)
        self.hooks = (PushWeights(self),)

    def _start(self, module: Any) -> None:
        from vllm import LLM  # only here: vllm is optional, for GPU machines

        # vLLM builds its model from a folder: the policy as it is now (a resumed run's restored weights), merged
        self._folder = tempfile.TemporaryDirectory(prefix="effitrain-vllm-policy-")
        with merged_for_inference(module):
            base = module.get_base_model() if hasattr(module, "get_base_model") else module
            # the weights under the plain model's names (a LoRA model's layers still hold their adapters)
            weights = {name: tensor.detach().clone() for name, tensor in engine_weights(module)}
        base.save_pretrained(self._folder.name, state_dict=weights, safe_serialization=True)
        self.tokenizer.save_pretrained(self._folder.name)
        # one engine per training process (external_launcher), as TRL's colocate mode; it reads these variables
        os.environ.setdefault("RANK", str(self.rank))
        os.environ.setdefault("LOCAL_RANK", str(self.rank))
        os.environ.setdefault("WORLD_SIZE", str(self.world_size))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29511")
        p = self.params
        kwargs = {"tensor_parallel_size": 1, "gpu_memory_utilization": p.gpu_memory_utilization,
                  "dtype": p.dtype, "distributed_executor_backend": "external_launcher",
                  # the checkpoint's generation_config.json must not add sampling defaults
                  "generation_config": "vllm", "seed": self.rank}
        if p.max_model_len is not None:
            kwargs["max_model_len"] = p.max_model_len
        self.llm = LLM(model=self._folder.name, **kwargs)

    def engine_model(self) -> Any:
        """The engine's torch model (where ``load_weights`` writes), as TRL reaches it in colocate mode."""
        return self.llm.llm_engine.model_executor.driver_worker.model_runner.model

    @torch.no_grad()
    def push(self, module: Any) -> None:
        """The policy's current weights into the engine (a no-op before the engine has started: it will start
        from the policy as it is then)."""
        if self.llm is None:
            return
        with merged_for_inference(module):
            target = self.engine_model()
            for name, tensor in engine_weights(module):
                target.load_weights([(name, tensor)])
        self.llm.reset_prefix_cache()  # cached prompt states were computed with the old weights
        self.pushes += 1

    @torch.no_grad()
    def sample(self, module: Any, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, seed: int) -> torch.Tensor:
        from vllm import SamplingParams

        if self.llm is None:
            self._start(module)
        prompts = unpadded(prompt_ids, prompt_mask)
        eos = self.tokenizer.eos_token_id
        # one request per prompt, n = G, each with its own seed from the micro-batch's: the same (seed, micro-step,
        # rank) draws the same completions on a resume; every other sampling knob is off, as model.generate's
        sampling = [SamplingParams(n=self.group_size, temperature=self.temperature, top_p=1.0, top_k=-1, min_p=0.0,
                                   repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
                                   max_tokens=self.max_new_tokens, seed=(seed + i) & 0x7FFFFFFF,
                                   stop_token_ids=[eos], detokenize=False) for i in range(len(prompts))]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompts], sampling, use_tqdm=False)
        token_ids = [list(o.token_ids) for out in outputs for o in out.outputs]
        if len(token_ids) != len(prompts) * self.group_size:
            raise RuntimeError(f"vLLM returned {len(token_ids)} completions for {len(prompts)} prompts x "
                               f"{self.group_size}")
        return completion_tensor(token_ids, self.tokenizer.pad_token_id, prompt_ids.device)

    def close(self) -> None:
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None


class PushWeights(Hook):
    """After every optimizer step, the policy's new weights go into the colocated engine, so the next batch is
    sampled by the policy that is trained (on-policy), not by the one the engine started from."""

    name = "grpo_generator_weights"

    def __init__(self, engine: ColocatedVllm) -> None:
        self.engine = engine

    def on_step_end(self, state: Any) -> None:
        self.engine.push(state.model)

    def on_fit_end(self, state: Any) -> None:
        self.engine.close()


def build_sampler(generator: Any, tokenizer: Any, *, group_size: int, max_new_tokens: int, temperature: float,
                  rank: int = 0, world_size: int = 1) -> Any:
    """The sampler of a validated ``objective.grpo.generator`` block (``None``: the default, transformers)."""
    backend = "transformers" if generator is None else generator.name
    common = {"group_size": group_size, "max_new_tokens": max_new_tokens, "temperature": temperature}
    if backend == "transformers":
        return PolicyGenerate(tokenizer, **common)
    if backend == "vllm":
        return ColocatedVllm(tokenizer, generator.params, rank=rank, world_size=world_size, **common)
    raise ValueError(f"objective.grpo.generator.backend: {backend!r} cannot sample for GRPO")
