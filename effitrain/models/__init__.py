"""Model builders: `transformers` causal LMs from presets or from a name/path."""
