"""Method group: engine hooks configured under ``methods: {name: {...}}`` (see effitrain.engine.events.Hook)."""
