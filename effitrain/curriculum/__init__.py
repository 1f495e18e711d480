"""Curricula: stateful, resumable samplers that decide the order of the packed training rows."""
