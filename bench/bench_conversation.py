"""Turn 2 of a conversation about an image: time to first token with the engine's caches vs cleared.

Turn 1 asks about an image and gets an answer; turn 2 sends the whole conversation again (as every
chat client does) with a new question. With the caches, turn 2 reuses the KV of the system prompt
and the image (and the image's SigLIP features) and prefills only the text after the image; with
`Engine.clear_caches()` before it, turn 2 runs SigLIP and the whole prompt again. Both answers are
checked to be identical (the cache never changes outputs).

    .venv/bin/python -m bench.bench_conversation [--shape mid] [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from PIL import Image

from bench.models import cached_model
from janus_core import Engine, EngineConfig, FinishedOutput, TokenOutput, UnderstandRequest
from janus_core.models.loader import load_model
from janus_core.sampling.params import SamplingParams
from janus_core.text.conversation import Message

GREEDY = SamplingParams(temperature=0.0)


def ask(engine: Engine, request: UnderstandRequest) -> tuple[float, list[int], int]:
    """Run one request alone; (seconds to its first token, its tokens, its prompt length)."""
    first: list[float] = []
    done: list[FinishedOutput] = []

    def sink(out) -> None:
        if isinstance(out, TokenOutput | FinishedOutput) and not first:
            first.append(time.perf_counter())
        if isinstance(out, FinishedOutput):
            done.append(out)

    started = time.perf_counter()
    engine.add_request(request, sink)
    engine.run_until_idle()
    if not done:
        raise RuntimeError(f"request {request.request_id} failed")
    return first[0] - started, done[0].result.token_ids, done[0].result.prompt_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="mid", help="tiny | mid | janus-pro-1b | janus-pro-7b")
    parser.add_argument("--model-dir", help="checkpoint directory (default: a random one of --shape, cached)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--answer-tokens", type=int, default=48, help="length of turn 1's answer")
    args = parser.parse_args()
    lm = load_model(str(cached_model(args.shape, args.model_dir)), args.device, args.dtype)
    engine = Engine(lm, EngineConfig(max_batch_size=1, max_context=min(lm.max_context, 2048)))
    rng = np.random.default_rng(0)
    warm = Image.fromarray(rng.integers(0, 255, (lm.image_size, lm.image_size, 3), dtype=np.uint8))
    ask(engine, UnderstandRequest("warm", "", [warm], 2, GREEDY, messages=[Message("user", "hi", 1)]))

    cached, cold = [], []
    for i in range(args.repeats):
        picture = Image.fromarray(rng.integers(0, 255, (lm.image_size, lm.image_size, 3), dtype=np.uint8))
        turn1 = [Message("user", "Describe this image in detail.", 1)]
        _, answer, _ = ask(engine, UnderstandRequest(f"t1-{i}", "", [picture], args.answer_tokens, GREEDY,
                                                     messages=turn1))
        turn2 = turn1 + [Message("assistant", lm.tokenizer.decode(answer, skip_special_tokens=True)),
                         Message("user", "What colour is the car in the picture?")]
        hot_s, hot_ids, prompt_len = ask(engine, UnderstandRequest(f"t2-{i}", "", [picture], 8, GREEDY,
                                                                   messages=turn2))
        engine.clear_caches()
        cold_s, cold_ids, _ = ask(engine, UnderstandRequest(f"t2c-{i}", "", [picture], 8, GREEDY, messages=turn2))
        if hot_ids != cold_ids:
            raise SystemExit(f"turn 2 answers differ with and without the cache: {hot_ids} vs {cold_ids}")
        cached.append(hot_s)
        cold.append(cold_s)
    stats = engine.stats()
    hot, cool = statistics.median(cached), statistics.median(cold)
    print(f"## turn 2 of a conversation about an image ({args.shape}, {args.device}, {lm.dtype}; "
          f"turn-2 prompt {prompt_len} tokens, median of {args.repeats})")
    print("| TTFT cached (s) | TTFT caches cleared (s) | cleared / cached |")
    print("|---|---|---|")
    print(f"| {hot:.4f} | {cool:.4f} | {cool / hot:.1f}x |")
    print(f"prefix hits {stats.prefix_cache_hits}, tokens reused {stats.prefix_tokens_reused}, "
          f"vision hits {stats.vision_cache_hits}")


if __name__ == "__main__":
    main()
