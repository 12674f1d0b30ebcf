"""Job queues: the one interface frontends and workers share, with in-memory and Redis backends."""

from server.queue.base import Delivery, IdempotencyConflict, JobQueue, QueueFull, QueueMisconfigured, QueueUnavailable

__all__ = ["Delivery", "IdempotencyConflict", "JobQueue", "QueueFull", "QueueMisconfigured", "QueueUnavailable",
           "create_queue"]


def create_queue(url: str, **options) -> JobQueue:
    """`memory` (default, one process) or `redis://host:port/db`."""
    if url in ("", "memory", "memory://"):
        from server.queue.memory import MemoryQueue

        return MemoryQueue(**{k: v for k, v in options.items() if k in MemoryQueue.OPTIONS})
    if url.startswith(("redis://", "rediss://", "unix://")):
        from server.queue.redis.queue import RedisQueue

        return RedisQueue(url, **{k: v for k, v in options.items() if k in RedisQueue.OPTIONS})
    raise ValueError(f"unknown queue {url!r}; use 'memory' or 'redis://host:port/db'")
