"""Block schemas, run-level schema, compatibility rules and config composition for the tool verbs (all torch-free)."""
