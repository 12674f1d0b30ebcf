"""The engine sizes its KV pool on the tiny checkpoint with the memory planner's arithmetic."""

from __future__ import annotations

from janus_core import Engine, EngineConfig
from janus_core.engine import memory
from janus_core.models.loader import load_model


def test_the_engine_sizes_its_pool_with_the_planners_arithmetic(tiny_hf_dir):
    tiny_hf = load_model(str(tiny_hf_dir), "cpu")  # not the session's oracle copy: an engine adapts its model
    per_token = memory.kv_bytes_per_token(tiny_hf.model.config.text_config, tiny_hf.dtype)
    engine = Engine(tiny_hf, EngineConfig(kv_cache_memory=100 * 16 * per_token + 5, pack_cpu_linears=False))
    assert engine.capacity == memory.capacity(100 * 16 * per_token + 5, per_token, tiny_hf.num_image_tokens)
    assert engine.pool.num_blocks == 100 and engine.kv.nbytes == 100 * 16 * per_token
    default = Engine(tiny_hf, EngineConfig(max_batch_size=4, pack_cpu_linears=False))
    # CPU default: what the batch cap could use at the model's context, at most 2 GiB.
    assert default.kv.nbytes == 2 * 4 * tiny_hf.max_context * per_token
