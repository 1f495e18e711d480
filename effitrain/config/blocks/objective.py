"""Objective group: what the training loop minimises (``objective: NAME``).

An objective is built once per run (it may own frozen models: a teacher, a reference) and called per micro-batch as
``objective(model, batch, state) -> (loss, metrics)``; see :mod:`effitrain.objectives`.  Evaluation always reports the
plain next-token loss, whatever the objective, so eval losses stay comparable between objectives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

from effitrain.config.rules import rule
from effitrain.registry import ConfigError, choices_text, param, register


@register("objective", "causal_lm", builder="effitrain.objectives.causal_lm:build",
          summary="The model's own next-token cross-entropy (mean over tokens); the default")
@dataclass
class CausalLMParams:
    pass


@register("objective", "weighted_causal_lm", builder="effitrain.objectives.weighted:build",
          summary="Per-example weighted next-token loss: sum_i w_i l_i / sum_i w_i, weights set by a method hook")
@dataclass
class WeightedCausalLMParams:
    default_weight: Optional[float] = param(1.0, gt=0, help="the weight of every example when no hook set "
                                            "batch['example_weights'] (then the loss is the mean of the examples' "
                                            "losses); null = a batch without weights is an error")


@register("objective", "distill", builder="effitrain.objectives.distill:build",
          summary="Logit distillation from a frozen teacher: alpha x T^2 KL(teacher || student) + (1 - alpha) x CE "
                  "(Hinton et al., 1503.02531)")
@dataclass
class DistillParams:
    teacher: str = param(help="the teacher: a save_pretrained folder (or a cached hub id) with the student's "
                              "vocabulary; in a stage, '@stage:NAME' is that stage's final model")
    temperature: float = param(2.0, gt=0, help="T: both distributions are softmax(logits / T)")
    alpha: float = param(0.5, ge=0, le=1, help="weight of the soft (teacher) loss; 1 - alpha weighs the hard "
                                               "next-token loss")
    loss: Literal["kl", "mse_logits"] = param("kl", help="kl: T^2 KL(softmax(t/T) || softmax(s/T)) per token "
                                              "(Hinton); mse_logits: mean squared error of the raw logits "
                                              "(Ba & Caruana), temperature unused")
    teacher_dtype: Literal["auto", "float32", "bfloat16"] = param(
        "auto", help="auto: bfloat16 on a GPU that supports it, else float32")
    # torchdistill's intermediate-representation losses (effitrain/objectives/feature_losses.py), each added with its
    # own weight. Mappings checked in validate() (a union with a dataclass would hide which inner key is wrong).
    hint: Optional[dict[str, Any]] = param(None, help="FitNets hint loss {student_layer, teacher_layer, weight}: squared error "
                                 "between a linear regressor of the student's hidden states and the teacher's; the "
                                 "regressor (only when the widths differ) trains with the student, is checkpointed "
                                 "with it and is dropped at export")
    attention: Optional[dict[str, Any]] = param(None, help="attention transfer {pairs: [[student_layer, teacher_layer], ...], "
                                      "weight, mode: code|paper} on per-position activation maps (Zagoruyko & "
                                      "Komodakis; torchdistill ATLoss)")
    pkt: Optional[dict[str, Any]] = param(None, help="probabilistic knowledge transfer {student_layer, teacher_layer, weight}: "
                                "KL between the cosine-similarity distributions of the batch's token representations "
                                "(Passalis & Tefas; torchdistill PKTLoss)")

    def validate(self, path: str) -> None:
        from effitrain.registry import parse_params

        for key, cls in (("hint", HintParams), ("attention", AttentionTransferParams), ("pkt", PKTParams)):
            value = getattr(self, key)
            if value is not None and not isinstance(value, cls):
                setattr(self, key, parse_params(cls, value, f"{path}.{key}"))

    def check_inputs(self, path: str, *, spec, deep: bool) -> None:
        from effitrain.config.inputs import check_model_folder

        check_model_folder(f"{path}.teacher", self.teacher, revision=None, need_tokenizer=False)


@dataclass
class HintParams:
    """FitNets (Romero et al., 1412.6550): the student's guided layer, regressed to the teacher's hint layer."""
    student_layer: int = param(ge=1, help="decoder layer of the student, 1-based (hidden_states[k])")
    teacher_layer: int = param(ge=1, help="decoder layer of the teacher, 1-based")
    weight: float = param(1.0, gt=0, help="weight of the hint loss in the total")
    normalize: bool = param(False, help="divide by the teacher's mean squared hidden-state norm over the counted "
                            "positions (a scale-free relative error, 1 for a zero prediction); a trained pre-norm "
                            "transformer's residual stream is large, so torchdistill's plain sum can swamp the "
                            "other terms")


@dataclass
class AttentionTransferParams:
    """Attention transfer (Zagoruyko & Komodakis, 1612.03928) as torchdistill's ATLoss computes it."""
    pairs: list[list[int]] = param(help="[[student_layer, teacher_layer], ...], 1-based decoder layers")
    weight: float = param(1.0, gt=0, help="weight of the summed pair losses in the total")
    mode: Literal["code", "paper"] = param("code", help="code: mean squared difference of the normalized maps "
                                           "(the authors' code, torchdistill's default); paper: L2 norm of the "
                                           "difference per sequence, averaged over the batch (Eq. 2)")

    def validate(self, path: str) -> None:
        if not self.pairs:
            raise ConfigError(f"{path}.pairs: empty; give at least one [student_layer, teacher_layer]")
        for i, pair in enumerate(self.pairs):
            if len(pair) != 2 or min(pair) < 1:
                raise ConfigError(f"{path}.pairs[{i}]: {pair} is not [student_layer, teacher_layer] with layers "
                                  f"counted from 1")


@dataclass
class PKTParams:
    """Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018) as torchdistill's PKTLoss computes it."""
    student_layer: int = param(ge=1, help="decoder layer of the student, 1-based (the last: the LM head's input)")
    teacher_layer: int = param(ge=1, help="decoder layer of the teacher, 1-based")
    weight: float = param(1.0, gt=0, help="weight of the PKT loss in the total")


def student_layers(params: Any) -> list[tuple[str, int]]:
    """(key, student layer) of every intermediate term of a distill objective."""
    named = []
    if params.hint is not None:
        named.append(("hint.student_layer", params.hint.student_layer))
    if params.attention is not None:
        named += [(f"attention.pairs[{i}]", pair[0]) for i, pair in enumerate(params.attention.pairs)]
    if params.pkt is not None:
        named.append(("pkt.student_layer", params.pkt.student_layer))
    return named


@rule("distill_student_layers_exist", "objective distill's hint/attention/pkt student layers must be decoder layers "
      "of a model built from config (model.num_layers); the teacher's are checked when it is loaded")
def _distill_student_layers(spec, env) -> Optional[str]:
    objective = spec.blocks["objective"]
    depth = getattr(spec.blocks["model"].params, "num_layers", None)
    if objective.name != "distill" or depth is None:
        return None
    for key, layer in student_layers(objective.params):
        if layer > depth:
            return (f"objective.{key}: student layer {layer} does not exist; model.num_layers={depth} "
                    f"(layers count from 1)")
    return None


@register("objective", "layerwise", builder="effitrain.objectives.layerwise:build",
          summary="The shared final norm + LM head on chosen intermediate layers, weighted (Sorted LLaMA / SoFT, "
                  "2309.08968)")
@dataclass
class LayerwiseParams:
    layers: list[int] = param(help="decoder layers whose output is decoded, 1-based (hidden_states[k] is the output "
                                   "of layer k; the last layer is the model's own logits)")
    weights: Optional[list[float]] = param(None, help="one weight per entry of layers (null: all 1, as SoFT sums "
                                           "the sub-models' losses with equal weight)")
    sample: Literal["all", "one"] = param(
        "all", help="all: every listed depth's loss in every step (Sorted LLaMA / SoFT); one: one depth per draw "
                    "(see draw_every), weighted by `weights` with a generator seeded by (seed, draw), trained alone "
                    "through a forward pass that stops at that depth (SortedNet's many-in-one training)")
    draw_every: Literal["micro_batch", "step"] = param(
        "micro_batch", help="sample=one: a new depth for every micro-batch, so one optimizer step accumulates the "
                            "gradients of several sub-models (the authors' SortedNet loop), or one depth for all "
                            "micro-batches of an optimizer step; every rank draws the same")
    seed: int = param(0, help="seed of sample=one's draws")

    def validate(self, path: str) -> None:
        if not self.layers:
            raise ConfigError(f"{path}.layers: empty; name at least one decoder layer (1-based), e.g. [2, 4]")
        if min(self.layers) < 1:
            raise ConfigError(f"{path}.layers: {min(self.layers)} is not a decoder layer; layers count from 1 "
                              f"(hidden_states[0], the embeddings, has no layer of its own)")
        if len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"{path}.layers: {self.layers} names a layer twice")
        if self.weights is not None:
            if len(self.weights) != len(self.layers):
                raise ConfigError(f"{path}.weights: {len(self.weights)} weights for {len(self.layers)} layers; give "
                                  f"one weight per layer")
            if min(self.weights) < 0 or sum(self.weights) <= 0:
                raise ConfigError(f"{path}.weights: {self.weights} must be >= 0 with a positive sum")


@register("objective", "sft", builder="effitrain.objectives.sft:build",
          summary="Supervised fine-tuning on chat data: next-token loss on the assistant tokens only")
@dataclass
class SFTParams:
    pass


def _check_reference_folder(self, path: str, *, spec, deep: bool) -> None:
    """``check_inputs`` of the objectives with a frozen reference (dpo, grpo): a given folder must hold a model, of
    the policy's vocabulary where both are folders that exist now (a model built from config has the size of its
    tokenizer, known only at launch, where the builder compares them)."""
    if self.reference is None:
        return
    from effitrain.config.inputs import check_model_folder, model_config_json

    check_model_folder(f"{path}.reference", self.reference, revision=None, need_tokenizer=False)
    policy_path = getattr(spec.block("model").params, "path", None)
    policy = model_config_json(policy_path) if isinstance(policy_path, str) else None
    reference = model_config_json(self.reference)
    if policy and reference and policy.get("vocab_size") != reference.get("vocab_size"):
        raise ConfigError(f"{path}.reference: the model at {self.reference} has a vocabulary of "
                          f"{reference.get('vocab_size')} tokens, the policy ({policy_path}) "
                          f"{policy.get('vocab_size')}; the reference must share the policy's tokenizer (null: a "
                          f"frozen copy of the policy at the start)")


def _pairs_per_step(self, rows: int, seq_len: int) -> str:
    """What one optimizer step trains on (``effitrain plan``): a row of the batch is a (chosen, rejected) pair."""
    return (f"{rows} preference pairs per step: chosen and rejected each a row of up to {seq_len} tokens, padded, "
            f"not packed; the tokens column counts {seq_len} per pair, as the run's log does")


@register("objective", "dpo", builder="effitrain.objectives.preference:build_dpo",
          summary="Direct Preference Optimization against a frozen reference model (Rafailov et al., 2305.18290)")
@dataclass
class DPOParams:
    beta: float = param(0.1, gt=0, help="beta: the strength of the implicit KL to the reference (the paper: 0.1; "
                                        "Tülu 3's length-normalized DPO: 5)")
    length_normalized: bool = param(False, help="divide each response's log-probability by its token count "
                                                "(Tülu 3's length-normalized DPO)")
    reference: Optional[str] = param(None, help="null: a frozen copy of the model at the start of the stage; else "
                                                "a save_pretrained folder (in a stage, '@stage:NAME')")

    check_inputs = _check_reference_folder
    step_description = _pairs_per_step


@register("objective", "simpo", builder="effitrain.objectives.preference:build_simpo",
          summary="SimPO: reference-free preference loss on length-normalized log-probabilities with a margin "
                  "(Meng et al., 2405.14734)")
@dataclass
class SimPOParams:
    beta: float = param(2.0, gt=0, help="beta (the authors' Llama-3-8B-base config: 2.0)")
    gamma_beta_ratio: float = param(0.5, ge=0, help="gamma / beta, the target margin (the authors: 0.5)")

    step_description = _pairs_per_step


@register("objective", "grpo", builder="effitrain.objectives.grpo_turns:build",
          summary="GRPO: sampled groups per prompt, group-normalised verifiable rewards, clipped ratio, KL to a "
                  "frozen reference (Shao et al., 2402.03300)")
@dataclass
class GRPOParams:
    rewards: list[dict[str, Any]] = param(
        default_factory=lambda: [{"name": "exact_answer"}],
        help="reward blocks summed with their weights: exact_answer (needs reference answers), format, length")
    group_size: int = param(8, ge=2, help="G: completions sampled per prompt (TRL's num_generations: 8)")
    max_new_tokens: int = param(16, ge=1, help="completion tokens at most (TRL's max_completion_length)")
    temperature: float = param(1.0, gt=0, help="sampling temperature; the log-probabilities use the same one")
    beta: float = param(0.04, ge=0, help="weight of the k3 KL estimate to the reference (DeepSeekMath: 0.04; 0 = "
                                         "no reference model is kept)")
    epsilon: float = param(0.2, gt=0, help="the ratio is clipped to [1 - epsilon, 1 + epsilon_high]")
    epsilon_high: Optional[float] = param(None, gt=0, help="upper clip (DAPO's clip-higher); null = epsilon")
    scale_rewards: Literal["group", "batch", "none"] = param(
        "group", help="divide the advantages by the group's reward std (GRPO), the micro-batch's, or not (Dr. GRPO)")
    iterations: int = param(1, ge=1, help="mu: optimizer steps per sampled batch (TRL's num_iterations: 1); > 1 "
                                          "reuses the samples, so the ratio moves from 1 and the clip acts")
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = param(
        "grpo", help="grpo: token mean per completion, then mean; bnpo: mean over the micro-batch's completion "
                     "tokens (verl's token-mean); dr_grpo: sum over tokens / (completions x max_new_tokens); dapo: "
                     "sum over tokens / the completion tokens of the micro-batch on all ranks (TRL's default)")
    entropy_coef: float = param(0.0, ge=0, help="subtract this times the policy's mean per-token entropy from the "
                                                "loss (verl's entropy_coeff; 0 = off, TRL's default)")
    no_eos_reward: Optional[float] = param(None, help="the reward of a completion cut at max_new_tokens without an "
                                                      "EOS, replacing the rewards' sum (Tülu 3's non_stop_penalty: "
                                                      "-10); null = rewarded like any other")
    reference: Optional[str] = param(None, help="null: a frozen copy of the model at the start of the stage; else "
                                                "a save_pretrained folder (in a stage, '@stage:NAME')")
    seed: int = param(0, help="sampling seed; a micro-batch's samples depend on (seed, micro-step, rank) only, so a "
                              "resumed run draws the same completions")
    generator: Optional[dict[str, Any]] = param(
        None, help="what samples the completions: null or {backend: transformers} = the policy's own generate; "
                   "{backend: vllm, gpu_memory_utilization: 0.3, ...} = a vLLM engine beside the policy on its GPU, "
                   "given the policy's weights after every optimizer step")
    decoupled_alpha: Optional[float] = param(
        None, gt=0, help="decoupled GRPO (Thinkless, 2505.13379): the first completion token (the control token "
                         "<short>/<think>) weighs alpha / completions and the response tokens are normalised apart "
                         "(decoupled_response), instead of loss_type's normalisation; the authors' alpha: 0.001; "
                         "null = off")
    decoupled_response: Literal["sequence", "token"] = param(
        "sequence", help="with decoupled_alpha, the response tokens' normalisation: sequence = mean over each "
                         "completion's tokens, then over completions (the paper's formula); token = mean over all "
                         "response tokens of the micro-batch (the authors' verl code)")
    # multi-turn rollouts (effitrain.objectives.grpo_turns); the defaults are the single-turn GRPO above
    turns: int = param(1, ge=1, help="policy turns per conversation: after each but the last the environment "
                                     "answers and the policy answers again; loss only on the policy's tokens")
    environment: Optional[dict[str, Any]] = param(
        None, help="what answers between the turns (needed when turns > 1): {name: scripted_user} (a fixed "
                   "message, SCoRe's self-correction prompt by default) or {name: verifier} (says right or wrong)")
    turn_reward_weights: Optional[list[float]] = param(
        None, help="one weight per turn on that turn's reward (null: 1 each); SCoRe's stage I: [0, 1] (only the "
                   "second attempt is rewarded)")
    turn_betas: Optional[list[float]] = param(
        None, help="one KL coefficient per turn (null: beta on every turn); SCoRe's stage I: [beta2, 0] (the first "
                   "attempt kept near the reference), stage II: [beta1, beta1]")
    progress_bonus: float = param(0.0, ge=0, help="alpha: turn t > 1 earns alpha x (r_t - r_(t-1)) on top, "
                                                  "SCoRe's reward shaping for self-correction (the paper: 10)")

    def validate(self, path: str) -> None:
        from effitrain.registry import REGISTRY

        self.generator_block = grpo_generator(self.generator, f"{path}.generator")
        if self.decoupled_alpha is not None and self.loss_type != "grpo":
            # the decoupled weights are the whole reduction: a second one would silently be ignored
            raise ConfigError(f"{path}.loss_type: '{self.loss_type}' does not apply with {path}.decoupled_alpha, "
                              f"whose weights replace it; keep loss_type=grpo and pick the response tokens' "
                              f"normalisation with {path}.decoupled_response=sequence|token")
        if self.decoupled_alpha is None and self.decoupled_response != "sequence":
            raise ConfigError(f"{path}.decoupled_response: only applies with {path}.decoupled_alpha (decoupled "
                              f"GRPO); set decoupled_alpha, e.g. 0.001, or drop decoupled_response")
        self.environment_block = _grpo_environment(self, path)
        if self.turns > 1 and self.decoupled_alpha is not None:
            # the decoupled weights address one completion's first token; a conversation has one per turn
            raise ConfigError(f"{path}.decoupled_alpha: decoupled GRPO weighs the first token of a single answer and "
                              f"does not apply to multi-turn rollouts ({path}.turns={self.turns}); drop one of them")

        if not self.rewards:
            raise ConfigError(f"{path}.rewards: empty; name at least one reward block, e.g. [{{name: exact_answer}}]")
        self.reward_blocks = [REGISTRY.parse("reward", r, f"{path}.rewards[{i}]") for i, r in enumerate(self.rewards)]
        names = [b.name for b in self.reward_blocks]
        if len(set(names)) != len(names):
            raise ConfigError(f"{path}.rewards: {names} names a reward twice; give each once with its weight")
        # a reward of weight 0 is still computed and logged (a monitor), but with every weight 0 all samples of a
        # group score alike, every advantage is 0 and nothing is learned
        if all(b.params.weight == 0 for b in self.reward_blocks):
            raise ConfigError(f"{path}.rewards: every reward has weight 0, so all samples score 0 and GRPO learns "
                              f"nothing; give at least one reward a non-zero weight")

    def step_description(self, rows: int, seq_len: int) -> str:
        """What one optimizer step trains on (``effitrain plan``): a row of the batch is a prompt, answered by a
        sampled group."""
        return (f"{rows} prompts per step, each answered {self.group_size} times: {rows * self.group_size} sampled "
                f"completions of up to {self.max_new_tokens} new tokens after prompts of up to {seq_len} tokens"
                + (f", each sampled batch reused for {self.iterations} steps" if self.iterations > 1 else "")
                + (f"; each conversation goes on for {self.turns} policy turns, the environment "
                   f"{self.environment_block.name} answering between them" if self.turns > 1 else "")
                + f"; the tokens column counts {seq_len} per prompt, as the run's log does")

    def check_inputs(self, path: str, *, spec, deep: bool) -> None:
        _check_reference_folder(self, path, spec=spec, deep=deep)
        if self.generator_block is not None:  # vllm: installed, and a GPU beside the policy to run on
            from effitrain.config.blocks.generator import _gpu_count
            from effitrain.config.inputs import package_available

            where = f"{path}.generator.backend"
            if not package_available("vllm"):
                raise ConfigError(f"{where}: vllm is not installed (pip install vllm, on a machine with a GPU); "
                                  f"use backend: transformers (the policy's own generate, the default)")
            if not _gpu_count():
                raise ConfigError(f"{where}: vllm runs beside the policy on its GPU and this machine has none; use "
                                  f"backend: transformers (the policy's own generate, the default)")


def _grpo_environment(params: "GRPOParams", path: str) -> Any:
    """The validated environment block of a multi-turn GRPO (None for one turn) and the per-turn lists checked."""
    from effitrain.registry import REGISTRY

    multi = params.turns > 1
    if not multi:
        for key in ("environment", "turn_reward_weights", "turn_betas"):
            if getattr(params, key) is not None:
                raise ConfigError(f"{path}.{key}: only used when {path}.turns > 1 (now {params.turns}); set turns: 2 "
                                  f"or more, or remove it")
        if params.progress_bonus:
            raise ConfigError(f"{path}.progress_bonus: rewards the change between turns, so it needs {path}.turns "
                              f"> 1; set turns: 2 or more, or remove it")
        return None
    if params.environment is None:
        raise ConfigError(f"{path}.environment: turns: {params.turns} needs an environment to answer between the "
                          f"turns; valid: {choices_text(REGISTRY.names('environment'))} (e.g. "
                          f"{{name: scripted_user}})")
    block = REGISTRY.parse("environment", params.environment, f"{path}.environment")
    for key in ("turn_reward_weights", "turn_betas"):
        values = getattr(params, key)
        if values is None:
            continue
        if len(values) != params.turns:
            raise ConfigError(f"{path}.{key}: {list(values)} has {len(values)} values for {params.turns} turns; "
                              f"give one per turn")
        if min(values) < 0:
            raise ConfigError(f"{path}.{key}: {list(values)} must all be >= 0")
    if params.generator_block is not None:
        raise ConfigError(f"{path}.generator.backend: multi-turn rollouts (turns: {params.turns}) sample with the "
                          f"policy's own generate; use backend: transformers (the default)")
    return block


# the sampling keys of a generator block that GRPO sets itself: its samples must be draws from softmax(logits / T)
# of the policy, the distribution its log-probabilities are taken from
_GRPO_OWNS = {"model": "the engine starts from the policy itself", "temperature": "objective.grpo.temperature",
              "max_new_tokens": "objective.grpo.max_new_tokens", "n": "objective.grpo.group_size",
              "seed": "objective.grpo.seed", "top_p": "off: log-probabilities are of softmax(logits / temperature)",
              "top_k": "off: log-probabilities are of softmax(logits / temperature)",
              "stop": "a completion ends at its EOS"}
# the keys each backend reads when it samples for GRPO (the rest of a generator block serves synthesis stages)
_GRPO_USES = {"transformers": (), "vllm": ("gpu_memory_utilization", "dtype", "max_model_len", "tensor_parallel_size")}
# TRL's vllm_gpu_memory_utilization for colocate mode: the policy, its optimizer and its activations share the GPU
_COLOCATED_GPU_SHARE = 0.3


def grpo_generator(raw: Any, path: str) -> Any:
    """The validated ``objective.grpo.generator`` block, or ``None`` for the default (the policy's generate)."""
    from effitrain.config.blocks.generator import parse_generator
    from effitrain.registry import _is_mapping

    if raw is None:
        return None
    if not _is_mapping(raw):
        raise ConfigError(f"{path}: expected a mapping such as {{backend: vllm}} (valid backends for GRPO: "
                          f"transformers, vllm), got {raw!r}")
    body = dict(raw)
    for key, owner in _GRPO_OWNS.items():
        if key in body:
            raise ConfigError(f"{path}.{key}: GRPO sets this itself ({owner}); remove it")
    backend = body.get("backend", "transformers")
    used = _GRPO_USES.get(backend)
    if used is not None:
        for key in body:
            if key != "backend" and key not in used:
                raise ConfigError(f"{path}.{key}: not used by GRPO's {backend} sampling (valid keys: "
                                  f"{', '.join(['backend', *used]) if used else 'backend only'})")
    if backend == "openai":
        raise ConfigError(f"{path}.backend: openai cannot sample for GRPO: a remote server's weights cannot be "
                          f"updated after each optimizer step, so its samples would be off-policy; use backend: "
                          f"transformers (the default) or vllm (a colocated engine on this process's GPU)")
    if backend == "vllm":
        if body.get("tensor_parallel_size", 1) != 1:
            raise ConfigError(f"{path}.tensor_parallel_size: GRPO runs one colocated vLLM engine per training "
                              f"process, on its own GPU; tensor_parallel_size must be 1")
        body.setdefault("gpu_memory_utilization", _COLOCATED_GPU_SHARE)
    body["model"] = "<the policy>"  # a placeholder the block's model check skips: the engine starts from the policy
    block = parse_generator(body, path)
    return None if block.name == "transformers" else block


@rule("grpo_needs_whole_parameters", "objective grpo samples with model.generate, which needs whole parameters: "
                                     "ZeRO <= 2 and no sequence parallelism")
def _grpo_whole_parameters(spec, env) -> Optional[str]:
    if spec.block("objective").name != "grpo":
        return None
    if spec.block("parallelism").params.stage == 3:
        return ("objective=grpo samples completions with whole parameters, which ZeRO-3 partitions; use "
                "parallelism=zero2")
    return None
