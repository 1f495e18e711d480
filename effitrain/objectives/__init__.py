"""Objectives: what the loop minimises.  The contract (docs/architecture.md, "Objective contract"):

* ``build(params, *, model, device, bf16_supported) -> objective`` is called once, before the run directory is taken
  and before the optimizer is built, on the model the optimizer trains (after peft); refusing the config there is a
  ``ConfigError``.
* ``objective(model, batch, state) -> (loss, metrics)`` per micro-batch.  ``model`` is the DeepSpeed engine: every
  forward of the trained model goes through it, so ZeRO-3 gathers its parameters.  ``loss`` is the 0-d tensor the
  loop back-propagates; ``metrics`` maps names to detached 0-d tensors, which the loop averages over each logging
  window and writes into the log line (no host sync before the log point).
* An objective with per-rank state that a resumed run needs (``grpo``'s samples reused over several steps) defines
  ``state_dict()`` / ``load_state_dict(state)``; the loop saves it in each rank's checkpoint file.
* Models an objective owns (a teacher, a reference) are its own: frozen, in eval mode, never in the optimizer or the
  checkpoints (they are loaded again from their path on resume).
* Parameters an objective trains (FitNets' hint regressor in ``distill``) are the opposite: it attaches them to the
  model with :func:`effitrain.models.training_only.attach` in its builder, which runs before the optimizer is built,
  so they train, are reduced and checkpointed with the model, and are left out of every export.
"""
