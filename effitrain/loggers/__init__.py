"""Metric sinks: console (progress bar and lines), metrics.jsonl, wandb, tensorboard."""
