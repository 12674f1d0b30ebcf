"""The engine loop, its output processor, its configuration and the memory model that sizes the KV pool."""
