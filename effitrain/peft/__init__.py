"""Parameter-efficient fine-tuning blocks (through `peft`)."""
