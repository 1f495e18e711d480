"""GRPO sampling through a generator backend (issue 25, item 4): ``objective.grpo.generator``.

What holds: ``transformers`` (the default, or named) draws exactly the completions and losses of the old sampling
code; the colocated ``vllm`` path is given token ids and returns them in GRPO's layout; the policy's weights are
pushed into the engine after every optimizer step, a LoRA policy's merged under the base model's names; a run whose
engine only ever sees the pushed weights ends with the engine at the trained policy's weights, and a run without
the push samples from a stale engine; ``openai``, GRPO-owned sampling keys, unused keys and vllm without a GPU are
one line at ``check``.  The real engine runs in the last test, where vllm and a GPU are.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from types import SimpleNamespace

import pytest
import torch
import transformers

from conftest import effitrain_cli
from effitrain.config.blocks import load_builtin_blocks
from effitrain.objectives import grpo, grpo_sampling
from effitrain.objectives.generation import generate_plainly, plain_generation_config
from effitrain.registry import REGISTRY, ConfigError

load_builtin_blocks()

from test_grpo import _prompt_batch, tiny_llama, tokenizer  # noqa: E402,F401 (the BPE fixture and helpers)


def _grpo(tokenizer, generator=None, **over):
    body = {"name": "grpo", "group_size": 4, "max_new_tokens": 6, "beta": 0.0,
            "rewards": [{"name": "length", "max_tokens": 6, "gated": False}], **over}
    if generator is not None:
        body["generator"] = generator
    return REGISTRY.parse("objective", body, "objective")


def _old_sample(model, tokenizer, ids, mask, group_size, max_new_tokens, temperature, seed):
    """GRPO.sample as main had it before the generator block (the reference for 'bit for bit')."""
    ids = ids.repeat_interleave(group_size, dim=0)
    mask = mask.repeat_interleave(group_size, dim=0)
    model.eval()
    config = plain_generation_config(do_sample=True, temperature=temperature, max_new_tokens=max_new_tokens,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = generate_plainly(model, config, input_ids=ids, attention_mask=mask)
    model.train()
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("generator", [None, {"backend": "transformers"}])
def test_transformers_backend_samples_and_scores_exactly_as_before(tokenizer, generator):
    model = tiny_llama(len(tokenizer), seed=1)
    block = _grpo(tokenizer, generator, temperature=0.8)
    assert block.params.generator_block is None
    obj = block.build(model=model, tokenizer=tokenizer)
    assert isinstance(obj.sampler, grpo_sampling.PolicyGenerate) and obj.hooks == ()
    batch, _ = _prompt_batch(tokenizer)
    ids, mask = grpo.left_pad(grpo.split_prompts(batch)[0], tokenizer.pad_token_id, "cpu")
    seed = grpo.sampling_seed(0, 3, 0)
    assert torch.equal(obj.sample(model, ids, mask, seed), _old_sample(model, tokenizer, ids, mask, 4, 6, 0.8, seed))
    # the whole objective: the same loss and metrics from the default and from the named backend
    state = SimpleNamespace(micro_step=3, step=3, rank=0)
    other = _grpo(tokenizer, None if generator else {"backend": "transformers"}, temperature=0.8)
    loss, metrics = obj(model, batch, state)
    loss2, metrics2 = other.build(model=model, tokenizer=tokenizer)(model, batch, state)
    assert torch.equal(loss, loss2) and all(torch.equal(metrics[k], metrics2[k]) for k in metrics)


@pytest.mark.parametrize("generator, says", [
    ({"backend": "openai", "base_url": "http://localhost:1/v1"}, "openai cannot sample for GRPO"),
    ({"backend": "vllm", "temperature": 0.5}, "generator.temperature: GRPO sets this itself"),
    ({"backend": "vllm", "n": 4}, "GRPO sets this itself (objective.grpo.group_size)"),
    ({"backend": "transformers", "batch_size": 4}, "generator.batch_size: not used by GRPO's transformers"),
    ({"backend": "vllm", "tensor_parallel_size": 2}, "tensor_parallel_size must be 1"),
    ({"backend": "sglang"}, "generator.backend"),
    ("vllm", "expected a mapping"),
])
def test_bad_generator_blocks_are_refused_with_what_is_valid(tokenizer, generator, says):
    with pytest.raises(ConfigError) as exc:
        _grpo(tokenizer, generator)
    assert says in str(exc.value) and "\n" not in str(exc.value)


def test_vllm_block_takes_trls_colocated_memory_share_unless_given(tokenizer):
    assert _grpo(tokenizer, {"backend": "vllm"}).params.generator_block.params.gpu_memory_utilization == 0.3
    given = _grpo(tokenizer, {"backend": "vllm", "gpu_memory_utilization": 0.5})
    assert given.params.generator_block.params.gpu_memory_utilization == 0.5


def test_check_refuses_vllm_without_a_gpu_in_one_line(tmp_path):
    fake = tmp_path / "site" / "vllm"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")  # installed, as far as check can tell; the GPU is what is missing
    args = ["check", "objective=grpo", "dataset=chat_demo", "dataset.format=prompts",
            "+objective.generator={backend:vllm}"]
    result = effitrain_cli(*args, env={"PYTHONPATH": str(tmp_path / "site"), "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "effitrain: error: objective.generator.backend: vllm runs beside the policy on its GPU and this machine has "
        "none; use backend: transformers (the policy's own generate, the default)"]
    refused = effitrain_cli(*args[:-1], "+objective.generator={backend:openai,base_url:'http://localhost:1/v1'}")
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "use backend: transformers (the default) or vllm" in refused.stderr


# ------------------------------------------------------------------------------------- the colocated engine's parts

def test_engine_prompts_are_the_unpadded_ids_and_its_completions_take_grpos_layout():
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert grpo_sampling.unpadded(ids, mask) == [[5, 6], [7, 8, 9, 10]]
    eos, pad = 2, 0
    # 2 prompts x G=2 as vLLM returns them: a completion stops at its EOS (kept), one ran to max_tokens
    completions = grpo_sampling.completion_tensor([[4, 2], [4, 4, 4], [2], [3, 3, 2]], pad, "cpu")
    assert completions.tolist() == [[4, 2, 0], [4, 4, 4], [2, 0, 0], [3, 3, 2]]
    assert grpo.completion_mask(completions, eos).sum(dim=1).tolist() == [2, 3, 1, 3]


def test_a_lora_policy_is_pushed_merged_under_the_base_models_names(tokenizer):
    import peft

    model = tiny_llama(len(tokenizer), seed=2)
    names = set(model.state_dict())
    policy = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                        init_lora_weights=False))
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    with grpo_sampling.merged_for_inference(policy):
        pushed = {name: t.clone() for name, t in grpo_sampling.engine_weights(policy)}
    merged = peft.get_peft_model(tiny_llama(len(tokenizer), seed=2), peft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    merged.load_state_dict(before)
    merged = merged.merge_and_unload().state_dict()
    tied = {n for n in names if n not in pushed}  # a tied lm_head is one parameter, pushed once (as TRL's)
    assert set(pushed) <= names and tied <= {"lm_head.weight"}
    assert all(torch.allclose(pushed[n], merged[n], atol=1e-6) for n in pushed)
    assert not torch.allclose(pushed["model.layers.0.self_attn.q_proj.weight"],
                              before["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"])
    after = policy.state_dict()  # unmerged again: training goes on with the adapters separate
    assert all(torch.allclose(after[k], before[k], atol=1e-6) for k in before)


# -------------------------------------------------- the push, in real runs, against an engine that only sees pushes

class _EngineModel:
    """What ``load_weights`` writes into: the engine's own copy of the model, loaded from the folder it was
    started from, changed by pushes only."""

    def __init__(self, folder: str) -> None:
        self.model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        self.params = dict(self.model.named_parameters())
        self.loads = 0

    def load_weights(self, pairs):
        for name, tensor in pairs:
            self.params[name].data.copy_(tensor)
            self.loads += 1


class _Llm:
    """A stand-in for ``vllm.LLM`` with its interface (token-id prompts, SamplingParams with n and a seed per
    request, outputs with ``.outputs[i].token_ids``), sampling from its own model copy."""

    started: list = []

    def __init__(self, model: str, **kwargs) -> None:
        self.kwargs = kwargs
        runner_model = _EngineModel(model)
        self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(driver_worker=SimpleNamespace(
            model_runner=SimpleNamespace(model=runner_model))))
        self.resets = 0
        _Llm.started.append(self)

    @property
    def model(self):
        return self.llm_engine.model_executor.driver_worker.model_runner.model

    def reset_prefix_cache(self):
        self.resets += 1

    @torch.no_grad()
    def generate(self, prompts, sampling, use_tqdm=False):
        outputs = []
        for prompt, sp in zip(prompts, sampling):
            ids = torch.tensor([prompt["prompt_token_ids"]])
            config = plain_generation_config(do_sample=True, temperature=sp.temperature, max_new_tokens=sp.max_tokens,
                                             pad_token_id=sp.stop_token_ids[0], eos_token_id=sp.stop_token_ids[0])
            config.num_return_sequences = sp.n
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sp.seed)
                out = generate_plainly(self.model.model, config, input_ids=ids)[:, ids.shape[1]:].tolist()
            rows = []
            for row in out:  # vLLM stops each sample at its EOS and returns what came before, the EOS included
                cut = row.index(sp.stop_token_ids[0]) + 1 if sp.stop_token_ids[0] in row else len(row)
                rows.append(SimpleNamespace(token_ids=row[:cut]))
            outputs.append(SimpleNamespace(outputs=rows))
        return outputs


@pytest.fixture
def stand_in_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM = _Llm
    module.SamplingParams = lambda **kw: SimpleNamespace(**kw)
    monkeypatch.setitem(sys.modules, "vllm", module)
    _Llm.started = []
    return _Llm


def test_the_engine_starts_from_the_policy_merged_and_samples_in_grpos_layout(tokenizer, stand_in_vllm):
    import peft

    policy = peft.get_peft_model(tiny_llama(len(tokenizer), seed=5), peft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    block = _grpo(tokenizer, {"backend": "vllm"})
    obj = block.build(model=policy, tokenizer=tokenizer)
    batch, _ = _prompt_batch(tokenizer)
    ids, mask = grpo.left_pad(grpo.split_prompts(batch)[0], tokenizer.pad_token_id, "cpu")
    completions = obj.sample(policy, ids, mask, 11)
    (engine,) = stand_in_vllm.started
    with grpo_sampling.merged_for_inference(policy):
        expected = {n: t.clone() for n, t in grpo_sampling.engine_weights(policy)}
    served = engine.model.model.state_dict()
    assert all(torch.allclose(served[n], expected[n], atol=1e-6) for n in expected)
    assert completions.shape[0] == ids.shape[0] * 4 and completions.shape[1] <= 6
    mask_ = grpo.completion_mask(completions, tokenizer.eos_token_id)
    assert (mask_.sum(dim=1) >= 1).all()
    assert torch.equal(obj.sample(policy, ids, mask, 11), completions)   # the same seeds, the same draws
    obj.sampler.close()


GRPO_RUN = ["objective=grpo", "dataset=chat_demo", "dataset.format=prompts", "dataset.max_docs_per_domain=60",
            "objective.group_size=4", "objective.max_new_tokens=4", "objective.beta=0.0",
            "objective.rewards=[{name:length,max_tokens:4,gated:false}]", "train.max_steps=3",
            "optimizer.lr=0.01", "+objective.generator={backend:vllm}"]


@pytest.mark.slow
def test_the_engine_gets_the_policys_weights_after_every_optimizer_step(tmp_path, train_in_process, stand_in_vllm,
                                                                        monkeypatch):
    train_in_process(GRPO_RUN, tmp_path / "pushed")
    (engine,) = stand_in_vllm.started
    assert engine.kwargs["distributed_executor_backend"] == "external_launcher"
    assert engine.kwargs["gpu_memory_utilization"] == 0.3
    # started at the first sample (from the initial policy), then one push after each of the 3 optimizer steps
    n_params = len(engine.model.params)
    assert engine.model.loads == 3 * n_params and engine.resets == 3
    final = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "pushed" / "final_model"),
                                                              dtype=torch.float32).state_dict()
    served = engine.model.model.state_dict()
    assert all(torch.equal(served[k], final[k]) for k in final)   # the engine ends at the trained policy

    # without the push the engine keeps serving the initial policy while the trained one moves on
    monkeypatch.setattr(grpo_sampling.PushWeights, "on_step_end", lambda self, state: None)
    train_in_process(GRPO_RUN, tmp_path / "stale")
    stale = stand_in_vllm.started[1]
    trained = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "stale" / "final_model"),
                                                                dtype=torch.float32).state_dict()
    assert stale.model.loads == 0
    assert not all(torch.equal(stale.model.model.state_dict()[k], trained[k]) for k in trained)


# ----------------------------------------------------------------------------------------- the real engine (a GPU)

@pytest.mark.skipif(importlib.util.find_spec("vllm") is None or not torch.cuda.is_available(),
                    reason="the colocated vLLM engine needs vllm installed and a CUDA GPU (one or both "
                           "missing here)")
def test_colocated_vllm_samples_token_ids_and_follows_pushed_weights(tokenizer):
    model = tiny_llama(len(tokenizer), seed=4).cuda()
    block = _grpo(tokenizer, {"backend": "vllm", "gpu_memory_utilization": 0.2, "dtype": "float32"}, temperature=1.0)
    obj = block.build(model=model, tokenizer=tokenizer, device="cuda")
    batch, _ = _prompt_batch(tokenizer)
    ids, mask = grpo.left_pad(grpo.split_prompts(batch)[0], tokenizer.pad_token_id, "cuda")
    first = obj.sample(model, ids, mask, 7)
    assert first.shape[0] == ids.shape[0] * 4 and first.shape[1] <= 6
    assert torch.equal(obj.sample(model, ids, mask, 7), first)        # the same seeds draw the same completions
    with torch.no_grad():  # logits x 1000: sampling at temperature 1 is then the policy's argmax
        model.lm_head.weight.mul_(1000.0)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        greedy = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].argmax(-1)
    (hook,) = obj.hooks
    hook.on_step_end(SimpleNamespace(model=model))   # what the engine's step_end event does after an update
    after = obj.sample(model, ids, mask, 7)
    expected = greedy.repeat_interleave(4)
    assert (after[:, 0] == expected).float().mean() >= 0.9   # the engine samples from the pushed weights
