"""Prometheus metrics with the names in DESIGN.md; the same names in every process that has them.

API processes count requests and queue depth; worker processes count what the engine did (turned
from `EngineStats` plain data into samples here). Each process serves its own registry.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from janus_core import EngineStats

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("janus_requests_total", "Requests answered, by endpoint and HTTP/gRPC status",
                                ["endpoint", "status"], registry=r)
        self.request_duration = Histogram("janus_request_duration_seconds", "End-to-end request latency",
                                          ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("janus_queue_depth", "Jobs waiting or running", registry=r)
        self.queue_wait = Histogram("janus_queue_wait_seconds", "Time from submit to a worker starting the job",
                                    ["kind"], buckets=LATENCY_BUCKETS, registry=r)
        self.request_phase = Histogram(
            "janus_request_phase_seconds", "Where a finished request's time went: queue, prefill, decode, encode "
            "(image decoding and encoding) and total (server.jobs.PHASES)", ["kind", "phase"],
            buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("janus_batch_size", "Requests per engine step", ["kind"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.running = Gauge("janus_running_requests", "Requests the engine is running", ["kind"], registry=r)
        self.images = Counter("janus_images_generated_total", "Images generated", registry=r)
        self.prompt_tokens = Counter("janus_prompt_tokens_total", "Prompt tokens processed", registry=r)
        self.generated_tokens = Counter("janus_generated_tokens_total", "Text tokens generated", registry=r)
        self.ttft = Histogram("janus_time_to_first_token_seconds", "Time from job start to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.decode_step = Histogram("janus_decode_step_seconds", "Duration of one decode step", ["kind"],
                                     buckets=STEP_BUCKETS, registry=r)
        self.heartbeat = Gauge("janus_worker_heartbeat_timestamp_seconds", "Last heartbeat of a worker",
                               ["worker"], registry=r)
        self.redeliveries = Counter("janus_redeliveries_total", "Jobs delivered again after a worker died",
                                    registry=r)
        self.dead_letters = Counter("janus_dead_letters_total", "Jobs moved to the dead-letter stream",
                                    registry=r)
        self.resubmissions = Counter("janus_resubmissions_total",
                                     "Jobs a frontend submitted again after Redis lost them", registry=r)
        self.worker_restarts = Counter("janus_worker_restarts_total",
                                       "Local worker processes restarted after they exited", registry=r)
        self.gpu_memory = Gauge("janus_gpu_memory_used_bytes", "GPU memory allocated by the engine", ["worker"],
                                registry=r)
        self.kv_usage = Gauge("janus_kv_cache_usage_ratio", "Share of the KV block pool held by running requests",
                              registry=r)
        self.kv_blocks = Gauge("janus_kv_cache_blocks", "KV blocks by state: free, used (held), cached (free, "
                               "reusable content)", ["state"], registry=r)
        self.kv_capacity = Gauge("janus_kv_cache_capacity_tokens", "Token positions the KV block pool holds",
                                 registry=r)
        self.preemptions = Counter("janus_preemptions_total", "Sequences sent back to wait because the KV pool ran "
                                   "dry (recomputed later, same output)", registry=r)
        self.rate_limited = Counter("janus_rate_limited_total", "Requests refused with 429 over an API key's quota",
                                    ["key"], registry=r)
        self.webhook_deliveries = Counter("janus_webhook_deliveries_total", "Webhook delivery tries by outcome: "
                                          "delivered, retry, rejected (not retried), failed (gave up after the "
                                          "last try), dropped (the job was gone)", ["outcome"], registry=r)
        self._last = EngineStats()
        self._last_queue: dict[str, int] = {}

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def observe_engine(self, stats: EngineStats) -> None:
        """Fold an engine snapshot into the counters (counters advance by the difference)."""
        for kind, value in stats.running.items():
            self.running.labels(kind).set(value)
        self.images.inc(max(stats.images_generated - self._last.images_generated, 0))
        self.prompt_tokens.inc(max(stats.prompt_tokens - self._last.prompt_tokens, 0))
        self.generated_tokens.inc(max(stats.generated_tokens - self._last.generated_tokens, 0))
        for kind, size in stats.batch_sizes:
            self.batch_size.labels(kind).observe(size)
        for kind, seconds in stats.step_seconds:
            self.decode_step.labels(kind).observe(seconds)
        self.kv_usage.set(stats.kv_usage_ratio)
        plain_free = stats.kv_blocks_total - stats.kv_blocks_used - stats.kv_blocks_cached
        for state, count in (("free", plain_free), ("used", stats.kv_blocks_used), ("cached", stats.kv_blocks_cached)):
            self.kv_blocks.labels(state).set(count)
        self.kv_capacity.set(stats.kv_capacity_tokens)
        self.preemptions.inc(max(stats.preemptions - self._last.preemptions, 0))
        self._last = stats

    def observe_queue(self, counters: dict[str, int]) -> None:
        """Fold a queue backend's cumulative counters (redeliveries, dead letters) into the counters."""
        for name, counter in (("redeliveries", self.redeliveries), ("dead_letters", self.dead_letters),
                              ("resubmissions", self.resubmissions)):
            now = counters.get(name, 0)
            counter.inc(max(now - self._last_queue.get(name, 0), 0))
        self._last_queue = dict(counters)
