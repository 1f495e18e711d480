"""Planning from a config alone (no torch, no model built): ``memory`` estimates per-device bytes."""
