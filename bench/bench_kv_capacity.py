"""KV memory per request and requests per GPU: the paged block pool against the fixed rows it replaced.

    PYTHONPATH=. python bench/bench_kv_capacity.py            # mid shape measured, 1B and 7B computed

Before, every understanding request held a whole row of min(4096, context) positions and every image
two rows of (512 + 576), whatever it used; the rows were sized by --max-batch-size (16 understanding
rows, 32 generation rows). Now a request holds the 16-token blocks its positions reach. Part 1 runs one
typical understanding request (one 384 px image, a question, 200 new tokens) through the engine on the
mid shape and reads the blocks it held at its largest from the pool; part 2 does the arithmetic for the
real Janus-Pro shapes (same config code as `janus-server plan`) and compares with the old fixed plan.
"""

from __future__ import annotations

import argparse

import numpy as np
from PIL import Image

from bench.models import SHAPES, cached_model, shape_config
from janus_core import Engine, EngineConfig, UnderstandRequest
from janus_core.engine import memory
from janus_core.models.loader import load_model
from janus_core.sched.block_pool import BLOCK_SIZE
from janus_core.text.processor import build_understanding_inputs
from janus_core.tiny.janus import build_tokenizer

NEW_TOKENS = 200
OLD_ROW = 4096  # the fixed understanding row of before
OLD_GEN_ROW = 512 + 576  # the fixed generation row of before (two per image)


def measured(shape: str) -> None:
    lm = load_model(str(cached_model(shape)), device="cpu")
    per_token = memory.kv_bytes_per_token(lm.model.config.text_config, lm.dtype)
    engine = Engine(lm, EngineConfig(max_batch_size=1))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (384, 384, 3), dtype=np.uint8))
    request = UnderstandRequest("r", "Describe this image in detail.", [image], max_new_tokens=NEW_TOKENS)
    prompt = len(build_understanding_inputs(lm, [image], request.prompt).input_ids)
    peak = 0
    engine.add_request(request, lambda _: None)
    while engine.step():
        peak = max(peak, engine.pool.num_used)
    before = min(OLD_ROW, lm.max_context) * per_token
    after = peak * BLOCK_SIZE * per_token
    print(f"## {shape}, fp32 on CPU, measured: one request of {prompt} prompt tokens + {NEW_TOKENS} new")
    print(f"   KV held: before {memory.format_size(before)} (a {min(OLD_ROW, lm.max_context)}-position row), "
          f"after {memory.format_size(after)} ({peak} blocks of {BLOCK_SIZE}): {before / after:.1f}x less")


def computed() -> None:
    print("\n## real shapes, bf16, computed (a 700-token image prompt + 200 new; images of 40-token prompts)")
    print(f"{'shape':>13} {'KV/token':>9} {'request before':>15} {'after':>9} {'GPU':>8} "
          f"{'old plan fits':>14} {'images before':>14} {'after':>6}")
    for name in ("janus-pro-1b", "janus-pro-7b"):
        config = shape_config(SHAPES[name], build_tokenizer())
        text = config.text_config
        per_token = memory.kv_bytes_per_token(text, "bfloat16")
        weights = memory.weights_bytes(config, "bfloat16")
        before = OLD_ROW * per_token
        after = memory.blocks_for(700 + NEW_TOKENS - 1) * BLOCK_SIZE * per_token
        old_kv = (16 * OLD_ROW + 32 * OLD_GEN_ROW) * per_token  # the old default: 16 rows + 16 images of 2 rows
        activation = memory.activation_bytes(text, "bfloat16", 8192, 128)
        for gib in (24, 80):
            device = gib * memory.GiB
            pool = memory.pool_bytes(device, 0.9, weights, activation)
            plan = memory.capacity(pool, per_token, int(config.vision_config.num_image_tokens), device)
            fits = "yes" if weights + old_kv + activation + memory.CUDA_RESERVE_BYTES <= device * 0.9 else "no"
            print(f"{name:>13} {per_token // 1024:>6} KiB {memory.format_size(before):>15} "
                  f"{memory.format_size(after):>9} {gib:>5} GiB {fits:>14} {16 if fits == 'yes' else 0:>14} "
                  f"{plan.concurrent_images:>6}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="mid", choices=sorted(SHAPES))
    args = parser.parse_args()
    measured(args.shape)
    computed()


if __name__ == "__main__":
    main()
