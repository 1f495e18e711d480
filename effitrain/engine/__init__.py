"""The DeepSpeed training loop, its events, checkpointing and metrics."""
