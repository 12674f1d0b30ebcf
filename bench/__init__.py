"""Benchmarks (scripts, not tests): janus-server's engine side by side with the reference implementations."""
