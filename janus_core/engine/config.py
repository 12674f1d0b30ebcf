"""The engine's configuration and the counters it exposes, in plain Python (the API layer reads both)."""

from __future__ import annotations

from dataclasses import dataclass, field

from janus_core.sched.block_pool import BLOCK_SIZE


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 16  # running images + understanding sequences; it does not size memory
    max_images: int = 4  # images per understanding request
    max_new_tokens: int = 2048
    max_context: int | None = None  # understanding prompt + new tokens; None: the model's
    max_generation_prompt: int = 512  # generation prompt tokens
    max_prefill_tokens: int = 8192  # prompt tokens admitted per step (at least one request always is)
    kv_cache_memory: int | None = None  # bytes of KV pool; None: from the device (CUDA) or a CPU default
    gpu_memory_utilization: float = 0.90  # CUDA: the share of the device the engine may fill
    prefix_caching: bool = True  # keep full KV blocks for reuse by later prompts with the same start
    attention: str = "auto"  # decode attention over the pool: "runs", "flex", or auto (flex on CUDA)
    vision_cache_bytes: int = 256 * 2**20
    compile: bool = False  # decode steps over flex attention as compiled static functions, one per batch bucket
    compile_backend: str = "inductor"  # torch.compile's backend for them ("eager": trace only, for tests)
    cuda_graphs: bool = False  # the static decode step (compiled with `compile`) captured per batch bucket (CUDA)
    overlap: bool | None = None  # stream step t's outputs while the device runs step t+1; None: on CUDA only
    pack_cpu_linears: bool = True  # CPU fp32 only: oneDNN-packed weights (janus_core.step.packed_linear)
    preview_share: float = 0.05  # the share of time the preview decoder may be busy (janus_core.engine.previews)

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {self.max_batch_size}")
        if self.max_context is not None and self.max_context < 2:
            raise ValueError(f"max_context must be at least 2, got {self.max_context}")
        if self.max_generation_prompt < 1:
            raise ValueError(f"max_generation_prompt must be at least 1, got {self.max_generation_prompt}")
        if self.kv_cache_memory is not None and self.kv_cache_memory < 1:
            raise ValueError(f"kv_cache_memory must be a positive number of bytes, got {self.kv_cache_memory}")
        if not (0.0 < self.gpu_memory_utilization <= 1.0):
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.attention not in ("auto", "runs", "flex"):
            raise ValueError(f"attention must be auto, runs or flex, got {self.attention!r}")
        if not (0.0 <= self.preview_share <= 1.0):
            raise ValueError(f"preview_share must be in [0, 1], got {self.preview_share}")
        if self.vision_cache_bytes < 0:
            raise ValueError("vision_cache_bytes must be >= 0")


@dataclass
class EngineStats:
    """Plain counters; the server turns them into metrics."""

    waiting: int = 0
    running: dict[str, int] = field(default_factory=lambda: {"understand": 0, "generate": 0})
    finished: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    images_generated: int = 0
    batch_sizes: list[tuple[str, int]] = field(default_factory=list)  # drained by the server
    step_seconds: list[tuple[str, float]] = field(default_factory=list)  # drained by the server
    vision_cache_hits: int = 0
    vision_cache_misses: int = 0
    prefix_cache_hits: int = 0  # understanding admissions that reused cached KV blocks
    prefix_cache_misses: int = 0
    prefix_tokens_reused: int = 0
    preemptions: int = 0
    kv_cache_bytes: int = 0
    kv_block_size: int = BLOCK_SIZE
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0  # held by running requests
    kv_blocks_cached: int = 0  # free, but holding reusable content until needed

    @property
    def kv_capacity_tokens(self) -> int:
        return self.kv_blocks_total * self.kv_block_size

    @property
    def kv_usage_ratio(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0
