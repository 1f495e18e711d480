"""GRPO and its verifiable rewards (issue #14).

What holds: advantages are zero-mean within each group (and unit-std where the group's rewards differ); the loss
equals the closed form on a hand-built case, the clip included, and TRL's GRPO loss on identical inputs; one update
on a crafted case raises the probability of the rewarded samples and lowers the others'; a micro-batch's samples
are a function of (seed, micro-step, rank); prompt rows give back the prompt and the reference answer; every reward
is checked on correct, wrong and malformed answers; GRPO's bad combinations are refused before anything is built.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import transformers

from effitrain.data import arithmetic_chat, chat
from effitrain.data.chat_sources import prompt_rows
from effitrain.objectives import grpo, rewards
from effitrain.config.blocks import load_builtin_blocks
from effitrain.registry import REGISTRY, ConfigError

load_builtin_blocks()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    import datasets

    from effitrain.data.tokenizer import train_bpe

    train, _ = arithmetic_chat.splits(300, 0)
    texts = [f"<|user|>\n{e['question']}\n<|assistant|>\n{e['answer']}" for e in train]
    folder = tmp_path_factory.mktemp("bpe")
    train_bpe(datasets.Dataset.from_dict({"text": texts}), 300, folder)
    return transformers.PreTrainedTokenizerFast.from_pretrained(str(folder))


def tiny_llama(vocab: int, seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(config)


def reward_blocks(*specs):
    return [REGISTRY.parse("reward", s, f"rewards[{i}]") for i, s in enumerate(specs)]


# ------------------------------------------------------------------------------------------------------- advantages

def test_advantages_are_zero_mean_per_group_and_divided_by_the_groups_std():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.0, 3.0, 0.0, 1.0])
    a = grpo.group_advantages(r, group_size=4)
    for group in a.view(3, 4):
        assert group.sum().abs() < 1e-6
    # group 1: mean 0.5, unbiased std sqrt(1/3); group 2: all equal, so no signal at all
    std = math.sqrt(1 / 3)
    assert a[:4].tolist() == pytest.approx([0.5 / (std + 1e-4), -0.5 / (std + 1e-4)] * 1 + [-0.5 / (std + 1e-4),
                                           0.5 / (std + 1e-4)], rel=1e-6)
    assert a[4:8].tolist() == [0.0] * 4
    assert a[8:].std().item() == pytest.approx(1.0, abs=1e-3)
    assert grpo.group_advantages(r, 4, scale="none")[:4].tolist() == [0.5, -0.5, -0.5, 0.5]  # Dr. GRPO: centred only


# ------------------------------------------------------------------------------------------------------------- loss

def test_loss_equals_the_clipped_closed_form_with_the_k3_kl():
    """Two completions, two tokens each (the second of completion 2 is padding), old log-probabilities set so that
    one ratio is clipped above and one below."""
    logps = torch.tensor([[-1.0, -2.0], [-0.5, -9.0]])
    old = torch.tensor([[-1.5, -2.0], [-0.2, -1.0]])
    ref = torch.tensor([[-1.2, -1.0], [-0.5, -3.0]])
    adv = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, stats = grpo.grpo_loss(logps, old, ref, adv, mask, beta=0.1, epsilon_low=0.2, epsilon_high=0.2)

    def term(lp, lo, lr, a):
        ratio = math.exp(lp - lo)
        surrogate = min(ratio * a, min(max(ratio, 0.8), 1.2) * a)
        kl = math.exp(lr - lp) - (lr - lp) - 1
        return -surrogate + 0.1 * kl
    first = (term(-1.0, -1.5, -1.2, 2.0) + term(-2.0, -2.0, -1.0, 2.0)) / 2   # ratio e^0.5 = 1.65: clipped to 1.2
    second = term(-0.5, -0.2, -0.5, -1.0)   # ratio e^-0.3 = 0.74 < 0.8, A < 0: clipped
    assert loss.item() == pytest.approx((first + second) / 2, rel=1e-6)
    assert stats["clip_ratio"].item() == pytest.approx(2 / 3)


def test_loss_equals_trls_on_identical_inputs(tokenizer, tmp_path):
    """TRL's GRPOTrainer._compute_loss and ours, on the same prompts, completions, advantages and reference
    log-probabilities, with the same policy weights, for each loss type."""
    trl = pytest.importorskip("trl", reason="trl is not installed (pip install -e '.[dev]' brings it)")
    import datasets

    tiny_llama(len(tokenizer), seed=3).save_pretrained(tmp_path / "policy")
    args = trl.GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
                          beta=0.04, use_cpu=True, report_to=[], bf16=False, max_completion_length=4,
                          temperature=0.7)
    trainer = trl.GRPOTrainer(model=str(tmp_path / "policy"), reward_funcs=[lambda completions, **k: [0.0] * 4],
                              args=args, train_dataset=datasets.Dataset.from_list([{"prompt": "a"}] * 4),
                              processing_class=tokenizer)
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which is not run here
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, len(tokenizer), (4, 5), generator=g)
    completion = torch.randint(0, len(tokenizer), (4, 4), generator=g)
    prompt_mask = torch.ones(4, 5, dtype=torch.long)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]])
    adv = torch.tensor([1.0, -0.5, 0.25, -0.75])
    ref = torch.randn(4, 4, generator=g) * 0.1 - 3.0
    ours_obj = grpo.GRPO(tokenizer, [], None, group_size=4, max_new_tokens=4, temperature=0.7, beta=0.04,
                         epsilon=0.2, epsilon_high=None, scale_rewards="group", loss_type="grpo", seed=0)
    trainer.model.train()
    logps = ours_obj.logps(trainer.model, torch.cat([prompt, completion], 1), torch.cat([prompt_mask, mask], 1), 5)
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        trainer.loss_type = loss_type
        theirs = trainer._compute_loss(trainer.model, {
            "prompt_ids": prompt, "prompt_mask": prompt_mask, "completion_ids": completion, "completion_mask": mask,
            "advantages": adv, "ref_per_token_logps": ref, "old_per_token_logps": None,
            "num_items_in_batch": mask.sum()})   # dapo's count: every completion token of the (one-process) batch
        ours, _ = grpo.grpo_loss(logps, logps.detach(), ref, adv, mask, beta=0.04, epsilon_low=0.2,
                                 epsilon_high=0.2, loss_type=loss_type, max_new_tokens=4,
                                 global_tokens=float(mask.sum()))
        assert ours.item() == pytest.approx(theirs.item(), rel=1e-5), loss_type


def test_dapo_weighs_every_token_of_all_ranks_alike_where_bnpo_weighs_each_ranks_mean():
    """Two data-parallel ranks with 6 and 2 completion tokens: the mean of their dapo losses (what averaging the
    ranks' gradients amounts to) is the sum over all 8 tokens / 8; bnpo's is the mean of the two ranks' means."""
    g = torch.Generator().manual_seed(0)
    ranks = [(torch.randn(2, 3, generator=g) - 2, torch.tensor([[1, 1, 1], [1, 1, 1]]), torch.tensor([1.0, -1.0])),
             (torch.randn(2, 3, generator=g) - 2, torch.tensor([[1, 0, 0], [1, 0, 0]]), torch.tensor([0.5, 2.0]))]

    def per_rank(loss_type):
        return [grpo.grpo_loss(lp, lp.detach(), None, a, m, beta=0.0, epsilon_low=0.2, epsilon_high=0.2,
                               loss_type=loss_type, global_tokens=8.0, world_size=2)[0].item() for lp, m, a in ranks]
    token_terms = [(-a.unsqueeze(1) * m).flatten()[m.flatten() == 1] for lp, m, a in ranks]  # ratio 1: -A per token
    every_token = torch.cat(token_terms).sum().item() / 8
    assert sum(per_rank("dapo")) / 2 == pytest.approx(every_token, rel=1e-6)
    assert sum(per_rank("bnpo")) / 2 == pytest.approx((token_terms[0].mean() + token_terms[1].mean()).item() / 2)
    assert every_token != pytest.approx(sum(per_rank("bnpo")) / 2)


def test_the_entropy_bonus_subtracts_its_weight_times_the_mean_token_entropy(tokenizer):
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]], [[1.0, 1.0, -1.0], [5.0, 0.0, 0.0]]])
    entropy = grpo.token_entropy(logits, temperature=0.6)
    p = torch.softmax(logits / 0.6, dim=-1)
    assert torch.allclose(entropy, -(p * p.log()).sum(-1))
    logps = torch.tensor([[-1.0, -1.1], [-0.4, -2.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    kwargs = dict(beta=0.0, epsilon_low=0.2, epsilon_high=0.2, loss_type="bnpo", entropy=entropy)
    plain, stats = grpo.grpo_loss(logps, logps.detach(), None, torch.tensor([1.0, -1.0]), mask, **kwargs)
    bonus, _ = grpo.grpo_loss(logps, logps.detach(), None, torch.tensor([1.0, -1.0]), mask, entropy_coef=0.001,
                              **kwargs)
    masked_mean = (entropy[0, 0] + entropy[0, 1] + entropy[1, 0]) / 3
    assert stats["entropy"].item() == pytest.approx(masked_mean.item())
    assert (plain - bonus).item() == pytest.approx(0.001 * masked_mean.item(), abs=1e-7)
    # in the objective: the entropies of the sampled completions, logged, only when the bonus is on
    def make(coef):
        return grpo.GRPO(tokenizer, [("len", 1.0, lambda r, ref, n: [float(x) for x in n])], None, group_size=4,
                         max_new_tokens=4, temperature=1.0, beta=0.0, epsilon=0.2, epsilon_high=None,
                         scale_rewards="group", loss_type="bnpo", seed=0, entropy_coef=coef)
    batch, _ = _prompt_batch(tokenizer)
    model = tiny_llama(len(tokenizer), seed=5)
    state = SimpleNamespace(step=0, micro_step=0, rank=0)
    with_bonus, metrics = make(0.001)(model, batch, state)
    without, plain_metrics = make(0.0)(model, batch, state)
    assert metrics["entropy"].item() > 0 and "entropy" not in plain_metrics
    assert (without - with_bonus).item() == pytest.approx(0.001 * metrics["entropy"].item(), abs=1e-6)


def test_a_completion_without_eos_gets_the_no_eos_reward_right_or_wrong(tokenizer):
    """Tülu 3's non-stop penalty (open-instruct replaces the score of a response that did not stop with -10)."""
    eos = 7
    completions = torch.tensor([[3, 4, eos, 0], [3, 4, 5, 6], [eos, 0, 0, 0], [1, 2, 3, 4]])
    rewards = torch.tensor([10.0, 10.0, 0.0, 0.0])
    assert grpo.without_eos_replaced(rewards, completions, eos, -10.0).tolist() == [10.0, -10.0, 0.0, -10.0]
    assert grpo.without_eos_replaced(rewards, completions, eos, None).tolist() == rewards.tolist()
    # wired into the objective: a model whose EOS logit is -1e9 never stops, so every sample gets -10
    obj = grpo.GRPO(tokenizer, [("one", 1.0, lambda r, ref, n: [1.0] * len(r))], None, group_size=4,
                    max_new_tokens=3, temperature=1.0, beta=0.0, epsilon=0.2, epsilon_high=None,
                    scale_rewards="group", loss_type="grpo", seed=0, no_eos_reward=-10.0)
    batch, _ = _prompt_batch(tokenizer)
    model = tiny_llama(len(tokenizer), seed=5)
    never_eos = torch.tensor([tokenizer.eos_token_id])
    model.lm_head.register_forward_hook(lambda module, args, out: out.index_fill(-1, never_eos, -1e9))
    _, metrics = obj(model, batch, SimpleNamespace(step=0, micro_step=0, rank=0))
    assert metrics["reward"].item() == -10.0 and metrics["reward_one"].item() == 1.0


# ------------------------------------------------------------------------------------------------- sampling, update

def _prompt_batch(tokenizer, n=2):
    examples = arithmetic_chat.splits(n, 0)[0]
    rows = prompt_rows(tokenizer, [e["messages"] for e in examples], seq_len=32).rows
    return chat.to_batch(torch.from_numpy(rows)), examples


def test_prompt_rows_give_back_the_prompt_and_the_reference_answer(tokenizer):
    batch, examples = _prompt_batch(tokenizer, 3)
    prompts, answers = grpo.split_prompts(batch)
    for prompt, answer, e in zip(prompts, answers, examples):
        assert prompt == chat.prompt_ids(tokenizer, e["messages"][:1])   # exactly what generation is given
        assert tokenizer.decode(answer, skip_special_tokens=True) == str(e["answer"])
        assert answer[-1] == tokenizer.eos_token_id                       # the reference ends as an answer should


def test_samples_depend_only_on_seed_micro_step_and_rank(tokenizer):
    model = tiny_llama(len(tokenizer), seed=1)
    obj = grpo.GRPO(tokenizer, [], None, group_size=4, max_new_tokens=6, temperature=1.0, beta=0.0, epsilon=0.2,
                    epsilon_high=None, scale_rewards="group", loss_type="grpo", seed=0)
    batch, _ = _prompt_batch(tokenizer)
    ids, mask = grpo.left_pad(grpo.split_prompts(batch)[0], tokenizer.pad_token_id, "cpu")
    first = obj.sample(model, ids, mask, grpo.sampling_seed(0, 5, 0))
    torch.rand(10)  # the global stream moves on; the samples must not care
    assert torch.equal(obj.sample(model, ids, mask, grpo.sampling_seed(0, 5, 0)), first)
    assert not torch.equal(obj.sample(model, ids, mask, grpo.sampling_seed(0, 6, 0)), first)
    assert first.shape == (2 * 4, 6)


def _opinionated_checkpoint(tokenizer, folder, sharpness, **generation):
    """A saved tiny model whose generation_config.json asks for ``generation``.  Its embeddings are tied, so the
    last input token is the likeliest next one (a repetition, what a repetition penalty acts on), more so as the
    final norm's ``sharpness`` scales the logits."""
    torch.manual_seed(3)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.norm.weight.mul_(sharpness)
    model.generation_config.update(**generation)
    model.save_pretrained(folder)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert all(getattr(loaded.generation_config, k) == v for k, v in generation.items())
    return loaded


def test_grpo_samples_from_softmax_of_logits_over_t_whatever_the_checkpoints_generation_config(tokenizer, tmp_path):
    """A checkpoint whose generation_config.json sets repetition_penalty=2.0 (and a top-k, a min-p): 4000 one-token
    completions of a prompt follow softmax(logits / T), the distribution GRPO scores them under (chi-square over
    the likeliest tokens and the rest, p = 0.001); the penalised distribution would be far off."""
    model = _opinionated_checkpoint(tokenizer, tmp_path / "ckpt", 4.0, do_sample=True, repetition_penalty=2.0,
                                    top_k=3, min_p=0.3)
    temperature, draws = 0.7, 4000
    obj = grpo.GRPO(tokenizer, [], None, group_size=draws, max_new_tokens=1, temperature=temperature, beta=0.0,
                    epsilon=0.2, epsilon_high=None, scale_rewards="group", loss_type="grpo", seed=0)
    batch, _ = _prompt_batch(tokenizer, 1)
    ids, mask = grpo.left_pad(grpo.split_prompts(batch)[0], tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[0, -1].double()
    probs = torch.softmax(logits / temperature, dim=-1)
    penalised = logits.clone()
    seen = ids[0].unique()
    penalised[seen] = torch.where(penalised[seen] > 0, penalised[seen] / 2.0, penalised[seen] * 2.0)
    penalised_probs = torch.softmax(penalised / temperature, dim=-1)

    sampled = obj.sample(model, ids, mask, grpo.sampling_seed(0, 0, 0))[:, 0]
    counts = torch.bincount(sampled, minlength=len(probs)).double()
    bins = probs.argsort(descending=True)[:6]                 # the likeliest tokens, each its own bin; then the rest

    def binned(p):
        rest = torch.ones_like(p, dtype=torch.bool)
        rest[bins] = False
        return torch.cat([p[bins], p[rest].sum().unsqueeze(0)])

    expected, observed = draws * binned(probs), binned(counts)
    assert float(expected.min()) >= 5                          # the chi-square approximation holds
    chi_square = float(((observed - expected) ** 2 / expected).sum())
    assert chi_square < 22.46                                  # 6 degrees of freedom, p = 0.001
    off = draws * binned(penalised_probs)                      # what the checkpoint's penalty alone would give
    assert float(((off - expected) ** 2 / expected).sum()) > 200
    assert model.generation_config.repetition_penalty == 2.0   # the checkpoint's own config is left as it was


def test_answer_accuracy_decodes_greedily_on_the_models_logits_whatever_its_generation_config(tokenizer, tmp_path):
    from effitrain.methods.answer_accuracy import AnswerAccuracy

    model = _opinionated_checkpoint(tokenizer, tmp_path / "ckpt", 8.0, repetition_penalty=2.0,
                                    no_repeat_ngram_size=1)
    batch, _ = _prompt_batch(tokenizer, 2)
    prompts, _ = grpo.split_prompts(batch)
    hook = AnswerAccuracy(tokenizer, examples=2, max_new_tokens=8, batch_size=2, extract="full")
    texts, lengths = hook.responses(model, prompts)
    repeats = 0
    for prompt, text, length in zip(prompts, texts, lengths):
        tokens = list(prompt)
        with torch.no_grad():                                  # greedy by hand: argmax of the plain logits
            for _ in range(length):
                tokens.append(int(model(input_ids=torch.tensor([tokens])).logits[0, -1].argmax()))
        generated = tokens[len(prompt):]
        assert text == tokenizer.decode(generated, skip_special_tokens=True)
        repeats += len(generated) - len(set(generated)) + len(set(generated) & set(prompt))
    assert repeats > 0      # the checkpoint's penalty and banned repeats would have changed these answers


def test_one_update_raises_the_probability_of_rewarded_samples(tokenizer):
    """Crafted case: the reward is the share of a completion's characters that are digits.  After one SGD step on
    the GRPO loss (beta 0), the completions that scored above their group's mean became more likely on average and
    those below less likely, and the advantage-weighted change (the surrogate the step climbs) is positive.  (Single
    completions may move against their sign: they share tokens and parameters with the others.)"""
    model = tiny_llama(len(tokenizer), seed=2)
    digits = {i for i in range(len(tokenizer)) if any(c.isdigit() for c in tokenizer.decode([i]))}

    def digit_share(responses, references, lengths):
        return [sum(ch.isdigit() for ch in r) / max(len(r), 1) for r in responses]

    obj = grpo.GRPO(tokenizer, [("digits", 1.0, digit_share)], None, group_size=8, max_new_tokens=5,
                    temperature=1.0, beta=0.0, epsilon=0.2, epsilon_high=None, scale_rewards="group",
                    loss_type="grpo", seed=7)
    batch, _ = _prompt_batch(tokenizer)
    state = SimpleNamespace(micro_step=0, rank=0)
    ids, pmask = grpo.left_pad(grpo.split_prompts(batch)[0], tokenizer.pad_token_id, "cpu")
    completions = obj.sample(model, ids, pmask, grpo.sampling_seed(7, 0, 0))   # what the objective will draw
    cmask = grpo.completion_mask(completions, tokenizer.eos_token_id)
    full = torch.cat([ids.repeat_interleave(8, 0), completions], 1)
    attention = torch.cat([pmask.repeat_interleave(8, 0), cmask], 1)
    texts = [tokenizer.decode(r[:n], skip_special_tokens=True) for r, n in zip(completions.tolist(), cmask.sum(1))]
    adv = grpo.group_advantages(torch.tensor(digit_share(texts, None, None)), 8)
    assert (adv > 0).any() and (adv < 0).any() and len(digits) > 0

    def mean_logp():
        with torch.no_grad():
            lp = obj.logps(model, full, attention, ids.shape[1])
        return (lp * cmask).sum(1) / cmask.sum(1)

    before = mean_logp()
    loss, metrics = obj(model, batch, state)
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.05 * p.grad
    change = mean_logp() - before
    assert change[adv > 0].mean() > 0 > change[adv < 0].mean()
    assert (adv * change).sum() > 0
    assert ((change > 0) == (adv > 0))[adv != 0].float().mean() >= 0.75  # most move with their advantage's sign
    assert metrics["reward"].item() == pytest.approx(sum(digit_share(texts, None, None)) / 16, rel=1e-5)


# ---------------------------------------------------------------------------------------------------------- rewards

def _score(spec, responses, references=None, lengths=None):
    (block,) = reward_blocks(spec)
    references = references or [""] * len(responses)
    return block.build()(responses, references, lengths or [1] * len(responses))


def test_exact_answer_on_correct_wrong_and_malformed_answers():
    assert _score({"name": "exact_answer"}, ["82", " 82\n", "83", "", "82 apples"], ["82"] * 5) == [1, 1, 0, 0, 0]
    boxed = {"name": "exact_answer", "extract": "boxed", "correct": 10.0}  # Tülu 3's RLVR gives 10
    refs = ["<think>40+42</think> \\boxed{82}"] * 5
    assert _score(boxed, ["<think>x</think> \\boxed{82}", "\\boxed{ 82.0 }", "\\boxed{83}", "\\boxed{82", "82"],
                  refs) == [10, 10, 0, 0, 0]   # right, right, wrong, unclosed, no box
    last = {"name": "exact_answer", "extract": "last_number"}
    assert _score(last, ["so it is 1,024", "first 3 then 7", "no number"], ["1024", "3", "0"]) == [1, 0, 0]


def test_format_reward_on_well_formed_partial_and_malformed_responses():
    responses = ["<think>8+0</think> \\boxed{8}", "\\boxed{8}", "<think>8+0</think> 8", "<think>8+0 \\boxed{eight}",
                 "\\boxed{}"]
    assert _score({"name": "format"}, responses) == [1.0, 0.5, 0.5, 0.0, 0.0]     # the authors' 0.5 + 0.5
    # their format-length score keeps the format part only when the answer is well formed
    assert _score({"name": "format", "zero_without_answer": True}, responses) == [1.0, 0.5, 0.0, 0.0, 0.0]
    with pytest.raises(ConfigError, match="checks nothing"):
        reward_blocks({"name": "format", "think": False, "answer": False})


def test_length_reward_follows_the_authors_curve_and_gates_on_the_answer():
    # max_tokens 100, peak 0.5: 0 at 0 tokens, 0.75 at 25, 1 at 50, 0.5 at 75, -1 at 100
    spec = {"name": "length", "max_tokens": 100, "peak": 0.5}
    boxed = ["\\boxed{8}"] * 5
    assert _score(spec, boxed, lengths=[0, 25, 50, 75, 100]) == pytest.approx([0.0, 0.75, 1.0, 0.5, -1.0])
    # without a well-formed answer only the penalty remains: min(0, length)
    assert _score(spec, ["8"] * 3, lengths=[50, 75, 100]) == pytest.approx([0.0, 0.0, -1.0])
    assert _score({**spec, "gated": False}, ["8"], lengths=[50]) == [1.0]


# ---------------------------------------------------------------------------------------------------------- config

def test_grpo_parses_its_reward_blocks_and_refuses_bad_ones():
    block = REGISTRY.parse("objective", {"name": "grpo", "rewards": [{"name": "format"}, {"name": "length"}]})
    assert [b.name for b in block.params.reward_blocks] == ["format", "length"]
    with pytest.raises(ConfigError, match=r"rewards\[0\].name: unknown reward 'exact'; valid: exact_answer, format"):
        REGISTRY.parse("objective", {"name": "grpo", "rewards": [{"name": "exact"}]})
    with pytest.raises(ConfigError, match="names a reward twice"):
        REGISTRY.parse("objective", {"name": "grpo", "rewards": [{"name": "format"}, {"name": "format"}]})
    with pytest.raises(ConfigError, match=r"group_size: .*>= 2"):
        REGISTRY.parse("objective", {"name": "grpo", "group_size": 1})


@pytest.mark.parametrize("overrides, message", [
    (["objective=grpo", "dataset=chat_demo"], "objective=grpo samples answers to prompts; use a chat dataset with "
                                              "dataset.format=prompts"),
    (["objective=sft", "dataset=chat_demo", "dataset.format=prompts"], "which objective=sft does not do"),
    (["objective=grpo", "dataset=chat_demo", "dataset.format=prompts", "parallelism=zero3"],
     "objective=grpo samples completions with whole parameters, which ZeRO-3 partitions"),
])
def test_grpo_combinations_are_refused_at_check(overrides, message):
    from conftest import effitrain_cli

    result = effitrain_cli("check", *overrides)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_answer_accuracy_reads_boxed_answers_and_reports_the_rl_rewards(tokenizer):
    """In an RL stage the held-out greedy answers are scored by the objective's own rewards (eval_reward and one
    figure per reward), next to the exact-match accuracy on the extracted answer."""
    from effitrain.methods.answer_accuracy import AnswerAccuracy
    from effitrain.objectives.rewards import build_rewards

    hook = AnswerAccuracy(tokenizer, examples=2, max_new_tokens=8, batch_size=2, extract="boxed")
    assert hook.is_right("<think>40+42</think> \\boxed{82}", 82) and not hook.is_right("82", 82)
    hook.rewards = build_rewards(reward_blocks({"name": "exact_answer", "extract": "boxed", "correct": 10.0},
                                               {"name": "format", "weight": 0.5}))
    hook.references = ["<think>40+42</think> \\boxed{82}", "<think>3*3</think> \\boxed{9}"]
    figures = hook.reward_metrics(["<think>40+42</think> \\boxed{82}", "\\boxed{8}"], [9, 4])
    # answer 1: right and well formed = 10 + 0.5 x 1; answer 2: wrong, no <think> = 0 + 0.5 x 0.5
    assert figures == pytest.approx({"eval_reward_exact_answer": 5.0, "eval_reward_format": 0.75,
                                     "eval_reward": (10.5 + 0.25) / 2, "eval_reward_std": (10.5 - 0.25) / 2})


def test_sft_then_grpo_rewards_are_r1s_accuracy_plus_format_on_the_sft_stages_answer_style(tokenizer):
    """The recipe's RL stage, as composed: DeepSeek-R1's rule-based rewards with weight 1 each, the accuracy reward
    on the boxed number and the format reward on the <think> reasoning, scored against references in the answer
    style the SFT stage trained (think_boxed).  A right, well-formed answer gets 2; each half alone 1."""
    from effitrain.config.compose import compose_config
    from effitrain.config.spec import validate
    from effitrain.objectives.rewards import build_rewards

    composed = compose_config(["+recipe=sft_then_grpo"])
    sft, rl = validate(composed.cfg, composed.recipes).stage_specs
    assert sft.block("objective").name == "sft" and rl.block("objective").name == "grpo"
    assert sft.block("dataset").params.answer_style == rl.block("dataset").params.answer_style == "think_boxed"
    params = rl.block("objective").params
    obj = grpo.GRPO(tokenizer, build_rewards(params.reward_blocks), None, group_size=5,
                    max_new_tokens=params.max_new_tokens, temperature=1.0, beta=params.beta, epsilon=0.2,
                    epsilon_high=None, scale_rewards="group", loss_type="grpo", seed=0)
    reference = arithmetic_chat.response("What is 40+42?", 82, "think_boxed")
    responses = [reference,                            # right and well formed
                 "<think>40+42</think> \\boxed{81}",    # well formed, wrong
                 "\\boxed{82}",                          # right, no reasoning block
                 "<think>40+42</think> 82",              # reasoning, no boxed answer to check
                 "82"]                                   # neither
    total, means = obj.score(responses, [reference] * 5, [9] * 5, "cpu")
    assert total.tolist() == [2.0, 1.0, 1.0, 1.0, 0.0]
    assert {k: round(float(v), 6) for k, v in means.items()} == {"reward_exact_answer": 0.4, "reward_format": 0.6}
    advantages = grpo.group_advantages(total, 5)
    assert advantages[0] > advantages[1] == advantages[2] == advantages[3] > advantages[4]


def test_iterations_reuse_the_samples_so_the_ratio_moves_and_is_clipped(tokenizer):
    """mu = 2: the second step of a cycle scores the first step's completions against the log-probabilities they
    were drawn with; after a large update the ratio leaves [0.8, 1.2] and is clipped.  The reused samples survive a
    state_dict round trip (a checkpoint), giving the same loss."""
    def make():
        def digit_share(responses, references, lengths):
            return [sum(ch.isdigit() for ch in r) / max(len(r), 1) for r in responses]
        return grpo.GRPO(tokenizer, [("digits", 1.0, digit_share)], None, group_size=4,
                         max_new_tokens=5, temperature=1.0, beta=0.0, epsilon=0.2, epsilon_high=None,
                         scale_rewards="group", loss_type="grpo", seed=3, iterations=2)
    model = tiny_llama(len(tokenizer), seed=5)
    obj = make()
    batch, _ = _prompt_batch(tokenizer)
    loss, first = obj(model, batch, SimpleNamespace(step=0, micro_step=0, rank=0))
    assert first["clip_ratio"].item() == 0.0 and set(obj.samples) == {0}
    assert obj.samples[0]["advantages"].abs().sum() > 0  # the crafted reward differs within the groups
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 2.0 * p.grad
    other_rows, _ = _prompt_batch(tokenizer, 3)  # what the loader gives at step 1 is not used
    loss2, second = obj(model, other_rows, SimpleNamespace(step=1, micro_step=1, rank=0))
    assert second["reward"].item() == first["reward"].item()          # the same completions
    assert second["clip_ratio"].item() > 0                             # the ratio moved out of the clip range
    e = obj.samples[0]
    logps = obj.logps(model, e["ids"], e["attention"], int(e["width"]))
    by_hand, _ = grpo.grpo_loss(logps, e["old_logps"], None, e["advantages"], e["mask"], beta=0.0,
                                epsilon_low=0.2, epsilon_high=0.2)
    assert loss2.item() == pytest.approx(by_hand.item(), rel=1e-6)
    restored = make()
    restored.load_state_dict(obj.state_dict())
    loss3, _ = restored(model, other_rows, SimpleNamespace(step=1, micro_step=1, rank=0))
    assert loss3.item() == pytest.approx(loss2.item(), rel=1e-6)
    # the next cycle samples afresh
    _, third = obj(model, batch, SimpleNamespace(step=2, micro_step=2, rank=0))
    assert third["clip_ratio"].item() == 0.0
