"""Tiny random checkpoints (Janus and JanusFlow) that the tests and benchmarks write for themselves."""
