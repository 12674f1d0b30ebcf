"""Attention over the paged KV pool: the pool's tensors, the CPU run-based path and flex attention."""
