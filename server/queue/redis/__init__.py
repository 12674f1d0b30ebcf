"""The Redis Streams queue: the queue, its Lua scripts, events, following streams, quotas and error mapping."""
