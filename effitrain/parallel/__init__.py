"""Parallelism: the DeepSpeed ZeRO section and the distributed launch environment."""
