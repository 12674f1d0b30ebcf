"""Settings: one object, read once at start-up from CLI flags and `JANUS_*` environment variables."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

CsvList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    # populate_by_name: a field with aliases (otlp_traces_endpoint) is still given by its name (the CLI does)
    model_config = SettingsConfigDict(env_prefix="JANUS_", extra="ignore", populate_by_name=True)

    # model and device
    model: str | None = None
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    compile: bool = False
    cuda_graphs: bool = False
    # LM linears and heads: int8 weight-only (CPU and CUDA) or fp8 (CUDA, compute capability >= 8.9)
    quantization: Literal["none", "int8", "fp8"] = "none"
    # serve on CUDA: the visible GPUs that get workers (indices into the visible list); empty: every one
    gpus: CsvList = Field(default_factory=list)
    cpu_packed_linears: bool = True  # CPU fp32: oneDNN-packed linear weights (faster decode steps)
    chat_format: Literal["janus-pro", "janus"] | None = None  # None: the checkpoint's template or family
    served_model_name: CsvList = Field(default_factory=list)  # names clients may use; empty: the checkpoint's
    # JanusFlow's VAE (directory or hub id); None: the checkpoint's vae/ if it has one, else stabilityai/sdxl-vae
    vae: str | None = None

    # network
    host: str = "0.0.0.0"
    port: int = 8000
    grpc_port: int = 50051  # 0 disables the gRPC server
    metrics_port: int = 9100  # worker processes only
    cors_origins: CsvList = Field(default_factory=list)

    # queue and workers
    queue: str = "memory"
    # serve: worker processes; None: one per GPU on CUDA (see --gpus), else 1. Several share a Redis queue:
    # --queue, or a private redis-server (this executable) that serve starts and stops on a unix socket
    workers: int | None = None
    redis_server: str = "redis-server"
    # the private redis-server's maxmemory (e.g. 4GiB); None: 1 GiB, or a quarter of the machine's memory if less.
    # Results wait there for result_ttl: raise it for many GPUs making large batches.
    redis_maxmemory: str | None = None
    max_queue_depth: int = 256
    request_timeout: float = 300.0  # seconds; becomes each job's deadline
    heartbeat_interval: float = 2.0
    heartbeat_max_age: float = 15.0  # /ready: a worker counts as live within this many seconds
    # A worker whose heartbeat is older than this has its jobs taken over at once (0: three
    # heartbeat intervals, at least 1 s); claim_idle_timeout stays as the backstop.
    heartbeat_timeout: float = 0.0
    result_ttl: float = 600.0  # synchronous requests' results, kept for Idempotency-Key retries
    job_ttl: float = 3600.0  # async jobs (Prefer: respond-async): how long a finished job and its result are kept
    # the in-process queue keeps at most this many finished results, and bytes of them (oldest go first)
    max_stored_results: int = 1024
    max_stored_result_bytes: int = 256 * 1024 * 1024
    max_deliveries: int = 3
    claim_idle_timeout: float = 60.0

    # Redis credentials and TLS: the password may also sit in the URL (redis://:PASSWORD@host or an
    # ACL user, redis://USER:PASSWORD@host); rediss:// URLs verify the server against queue_tls_ca.
    queue_password: SecretStr | None = None
    queue_tls_ca: str | None = None
    # Redis connections per process (commands wait for a free one; followers share one reader)
    queue_max_connections: int = 64

    # batching and memory
    max_batch_size: int = 16  # images + understanding sequences running at once; does not size memory
    max_context: int | None = None  # understanding prompt + new tokens per sequence; None: the model's
    kv_cache_memory: str | None = None  # KV block pool size, e.g. 6GiB; None: from the GPU, or 2 GiB on CPU
    gpu_memory_utilization: float = 0.90  # CUDA: the share of the device weights + activations + KV may fill
    prefix_caching: bool = True  # keep full KV blocks for later prompts with the same start
    vision_cache_mb: int = 256  # SigLIP features of recent images
    # the share of time the preview decoder may be busy (janus_core.engine.previews): previews cost at most that
    preview_share: float = Field(0.05, ge=0.0, le=1.0)

    # limits
    max_body_bytes: int = 32 * 1024 * 1024
    max_image_bytes: int = 16 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    min_image_side: int = 1  # the processor pads any image to square, as transformers' does
    max_images: int = 4
    max_n: int = 16
    max_new_tokens: int = 2048
    max_prompt_chars: int = 16_000

    # security
    api_key: CsvList = Field(default_factory=list)  # any of these keys is accepted; empty = no auth
    # Named keys with quotas (YAML or JSON; server.keys): reloaded when the file changes or on SIGHUP.
    api_keys_file: str | None = None
    require_api_key: bool = False  # refuse to start without a key (the shipped deployments set it)
    # With a key set these stay behind it unless opened (e.g. for a Prometheus that sends no key).
    open_docs: bool = False  # /openapi.json
    open_metrics: bool = False  # /metrics
    open_reflection: bool = False  # gRPC server reflection
    grpc_max_concurrent_rpcs: int = 1024  # calls beyond it are refused with RESOURCE_EXHAUSTED
    # HTTP connections (and requests) at once; beyond it uvicorn answers 503 at once, so idle or slow clients
    # cannot hold sockets and memory without bound. A last resort: quotas and the queue refuse long before.
    max_connections: int = 4096
    allowed_image_hosts: CsvList = Field(default_factory=list)  # hosts that remote image URLs may name
    image_fetch_timeout: float = 15.0  # seconds for all of one remote image: resolving, connecting, reading
    # Async jobs' webhooks: the hosts a "webhook" URL may name (empty: webhooks refused), the HMAC secret that
    # signs every delivery (shared by every frontend), and the waits in seconds between tries (5 tries, ~10 min)
    allowed_webhook_hosts: CsvList = Field(default_factory=list)
    webhook_secret: SecretStr | None = None
    webhook_retry_delays: CsvList = Field(default_factory=lambda: ["15", "60", "180", "360"])
    webhook_timeout: float = 10.0  # seconds for one delivery: connecting, sending, the receiver's answer

    playground: bool = True  # the browser page at / and /playground

    log_level: str = "info"
    log_json: bool = True  # false: plain text log lines
    access_log: bool = True  # one line per HTTP request (and gRPC call), refusals with their reason
    # OpenTelemetry traces (server.tracing; the extra janus-server[tracing]): the OTLP/HTTP URL spans are POSTed
    # to, e.g. http://collector:4318/v1/traces; None: off. OpenTelemetry's own variable is the fallback.
    otlp_traces_endpoint: str | None = Field(default=None, validation_alias=AliasChoices(
        "JANUS_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))

    @field_validator("api_key", "cors_origins", "allowed_image_hosts", "served_model_name", "gpus",
                     "allowed_webhook_hosts", "webhook_retry_delays", mode="before")
    @classmethod
    def _split_csv(cls, value):
        # `JANUS_API_KEY=a,b` and a single flag value both work.
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("max_batch_size", "workers", "max_queue_depth", "max_n", "max_images", "max_new_tokens")
    @classmethod
    def _positive(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"must be at least 1, got {value}")
        return value

    @field_validator("kv_cache_memory", "redis_maxmemory")
    @classmethod
    def _size(cls, value: str | None) -> str | None:
        if value is not None:
            from janus_core import parse_size

            if parse_size(value) < 1:
                raise ValueError(f"must be a positive size such as 6GiB, got {value!r}")
        return value

    @field_validator("otlp_traces_endpoint")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        from urllib.parse import urlsplit

        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be an http:// or https:// URL such as http://collector:4318/v1/traces, "
                             f"got {value!r}")
        return value

    @field_validator("gpu_memory_utilization")
    @classmethod
    def _fraction(cls, value: float) -> float:
        if not (0.0 < value <= 1.0):
            raise ValueError(f"must be in (0, 1], got {value}")
        return value

    @field_validator("job_ttl", "result_ttl", "webhook_timeout")
    @classmethod
    def _seconds(cls, value: float) -> float:
        if not value >= 0.01:
            raise ValueError(f"must be at least 0.01 seconds, got {value}")
        return value

    @field_validator("webhook_retry_delays")
    @classmethod
    def _delays(cls, value: list[str]) -> list[str]:
        for v in value:
            try:
                ok = float(v) >= 0
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(f"must be seconds (numbers >= 0) separated by commas, got {v!r}")
        return value

    @property
    def webhook_delays(self) -> list[float]:
        """Seconds to wait before each retry of a webhook delivery (one try more than there are delays)."""
        return [float(v) for v in self.webhook_retry_delays]

    @property
    def kv_cache_bytes(self) -> int | None:
        from janus_core import parse_size

        return parse_size(self.kv_cache_memory) if self.kv_cache_memory is not None else None

    @property
    def dead_worker_timeout(self) -> float:
        return self.heartbeat_timeout or max(3 * self.heartbeat_interval, 1.0)

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_key) or self.api_keys_file is not None
