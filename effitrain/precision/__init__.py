"""Mixed precision: the DeepSpeed bf16/fp16 sections and the rules on where they run."""
