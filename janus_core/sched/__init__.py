"""Scheduling in plain Python: sequences, their row layouts, the scheduler, the block pool and the KV manager (no
torch).
"""
