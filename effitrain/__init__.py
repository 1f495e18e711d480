"""effitrain: declarative, recipe-driven efficient training of language models on DeepSpeed."""

__version__ = "0.1.0"
