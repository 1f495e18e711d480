"""``curriculum: skill_it``: an online mixture over the data's domains (skills), updated from per-domain eval losses.

Skill-It (Chen et al. 2023, arXiv 2307.14430; the authors' ``trainer/mw_trainer.py`` in HazyResearch/skill-it) keeps
a sampling distribution over ``k`` skills and, every ``update_every`` steps, sets it to::

    p  ∝  prior ⊙ exp(eta · A · Σ_{τ in the last `window` evaluations} L(τ))

``L(τ)`` is the vector of per-skill validation losses of evaluation ``τ``, and ``A[i, j]`` says how much training on
skill ``i`` helps skill ``j`` (the skills graph; the identity when skills are independent).  As in the authors' code
the exponent is applied to the *prior*, not to the previous weights, with a look-back window of evaluations (their
``--mw_window``, 3), and the first distribution is ``prior ⊙ exp(eta · A · prior)`` (their ``loss_init``).

How it plugs in: the rows are drawn by the ``curriculum: mixture`` sampler (per-step domain draws, one permutation
stream per domain, the same resumable state), reading its weights from a :class:`LiveMixture` instead of the
timeline; the :class:`SkillItHook` (the sampler's ``hook``, registered by the engine) appends each evaluation's
per-domain losses (``eval_loss/DOMAIN``, computed by the loop's evaluation) and performs the update at every
evaluation whose step is a multiple of ``update_every``.  The loop evaluates after ``step_end`` and before the next
step's first batch is drawn, so the new weights apply from the next step on, and the checkpoint written at that step
already holds them.  Every distribution the run uses is logged on the evaluation's line of ``metrics.jsonl`` as
``mixture/DOMAIN``.

Resuming: the hook's state (current weights, the loss window, the number of updates) goes into every checkpoint
under ``skill_it``; the sampler's state is the mixture sampler's.  A resumed run therefore draws exactly the rows the
uninterrupted run would.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from effitrain.curriculum.mixture import MixtureSampler
from effitrain.engine.events import Hook
from effitrain.errors import RunFailed
from effitrain.registry import ConfigError, choices_text


def skills_graph(names: Sequence[str], kind: str, edges: Optional[dict[str, dict[str, float]]]) -> np.ndarray:
    """The ``k x k`` matrix ``A`` over ``names``: the identity, plus the declared ``edges[i][j]`` (a declared
    diagonal entry replaces its 1)."""
    graph = np.eye(len(names))
    edges = edges or {}
    if kind == "identity":
        if edges:
            raise ConfigError("curriculum.edges: set only with curriculum.graph=declared (graph is 'identity')")
        return graph
    if not edges:
        raise ConfigError("curriculum.edges: graph=declared needs the edges, e.g. {docstrings: {code: 0.5}}")
    index = {n: i for i, n in enumerate(names)}
    for src, row in edges.items():
        for dst, value in row.items():
            for name in (src, dst):
                if name not in index:
                    raise ConfigError(f"curriculum.edges: domain '{name}' is not a domain of the training data; "
                                      f"valid: {choices_text(names)}")
            graph[index[src], index[dst]] = float(value)
    return graph


def multiplicative_weights(prior: np.ndarray, graph: np.ndarray, losses: np.ndarray, eta: float) -> np.ndarray:
    """Skill-It's update ``prior ⊙ exp(eta · A · losses)``, normalised to sum to 1.  ``losses`` is the per-skill
    loss vector (already summed over the look-back window).  The exponent is shifted by its maximum before ``exp``
    (the normalised result is the same) so that large losses or ``eta`` cannot overflow."""
    exponent = eta * graph.dot(losses)
    weights = prior * np.exp(exponent - exponent.max())
    return weights / weights.sum()


class LiveMixture:
    """What :class:`MixtureSampler` reads in place of a timeline: the current weights, the same at every step."""

    def __init__(self, weights: dict[str, float]) -> None:
        self.current = dict(weights)

    @property
    def points(self) -> dict[str, list]:
        return {"mixture": [(0, self.current)]}

    def value(self, name: str, step: int) -> dict[str, float]:
        return self.current


class SkillItHook(Hook):
    name = "skill_it"

    def __init__(self, names: Sequence[str], mixture: LiveMixture, *, prior: np.ndarray, graph: np.ndarray,
                 eta: float, update_every: int, window: int) -> None:
        self.names = list(names)
        self.mixture = mixture
        self.prior, self.graph = prior, graph
        self.eta, self.update_every, self.window = eta, update_every, window
        self.losses: list[list[float]] = []  # the per-domain eval losses of the last `window` evaluations
        self.updates = 0
        self.set_weights(multiplicative_weights(prior, graph, prior, eta))  # the authors' loss_init = prior

    @property
    def weights(self) -> np.ndarray:
        return np.array([self.mixture.current[d] for d in self.names])

    def set_weights(self, weights: np.ndarray) -> None:
        self.mixture.current = {d: float(w) for d, w in zip(self.names, weights)}

    def observe(self, eval_metrics: dict[str, float]) -> np.ndarray:
        missing = [d for d in self.names if f"eval_loss/{d}" not in eval_metrics]
        if missing:
            raise RunFailed(f"curriculum=skill_it: the evaluation has no loss for domain '{missing[0]}'; Skill-It "
                            f"needs a held-out set per training domain (dataset eval split)")
        losses = np.array([eval_metrics[f"eval_loss/{d}"] for d in self.names], dtype=np.float64)
        self.losses = (self.losses + [losses.tolist()])[-self.window:]
        return losses

    def update(self) -> np.ndarray:
        """The update from the window of evaluations seen so far (the authors sum the window's loss vectors)."""
        window_sum = np.asarray(self.losses, dtype=np.float64).sum(axis=0)
        self.set_weights(multiplicative_weights(self.prior, self.graph, window_sum, self.eta))
        self.updates += 1
        return self.weights

    def on_eval_end(self, state: Any) -> None:
        self.observe(state.eval_metrics)
        # no update at the final evaluation: no step would draw from it (the loop saves the last checkpoint before
        # that evaluation, so an update there would not be in it either)
        updated = 0 < state.step < state.spec.train.max_steps and state.step % self.update_every == 0
        if updated:
            self.update()
            state.eval_metrics["mixture_updates"] = self.updates
        if state.step == 0 or updated:  # the distribution the next steps draw from
            state.eval_metrics.update({f"mixture/{d}": w for d, w in self.mixture.current.items()})

    def state_dict(self) -> dict[str, Any]:
        return {"names": self.names, "weights": dict(self.mixture.current), "losses": self.losses,
                "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["names"]) != self.names:
            raise ConfigError(f"resume: the checkpoint's Skill-It weights are over domains "
                              f"{choices_text(state['names'])}, this run's data has {choices_text(self.names)}")
        self.mixture.current = {d: float(state["weights"][d]) for d in self.names}
        self.losses = [list(map(float, row)) for row in state["losses"]]
        self.updates = int(state["updates"])


class SkillItSampler(MixtureSampler):
    """The mixture sampler drawing with the weights the Skill-It hook sets (``self.hook``)."""

    def __init__(self, domains: np.ndarray, *, prior: Optional[dict[str, float]], graph: str,
                 edges: Optional[dict[str, dict[str, float]]], eta: float, update_every: int, window: int,
                 **layout: Any) -> None:
        names = sorted(set(np.asarray(domains).tolist()))
        for d in prior or {}:
            if d not in names:
                raise ConfigError(f"curriculum.prior: domain '{d}' is not a domain of the training data; valid: "
                                  f"{choices_text(names)}")
        prior_vec = np.array([float((prior or {}).get(d, 1.0)) for d in names])
        if not prior_vec.sum() > 0:
            raise ConfigError("curriculum.prior: at least one domain needs a positive prior")
        mixture = LiveMixture({d: 1.0 / len(names) for d in names})
        super().__init__(domains, mixture, **layout)
        self.hook = SkillItHook(names, mixture, prior=prior_vec, graph=skills_graph(names, graph, edges), eta=eta,
                                update_every=update_every, window=window)


def build_skill_it(params: Any, packed: Any, *, seed: int, micro_batch_size: int, grad_accum: int, world_size: int,
                   rank: int) -> SkillItSampler:
    """The ``curriculum: skill_it`` builder; ``packed``'s ``domain`` column gives the skills."""
    from effitrain.data.packing import domain_array

    return SkillItSampler(domain_array(packed), prior=params.prior, graph=params.graph, edges=params.edges,
                          eta=params.eta, update_every=params.update_every, window=params.window, seed=seed,
                          micro_batch_size=micro_batch_size, grad_accum=grad_accum, world_size=world_size, rank=rank)
