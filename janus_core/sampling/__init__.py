"""Sampling: parameters and seeds (plain Python), the batched seeded sampler and its counter-based stream."""
