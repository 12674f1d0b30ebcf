"""What previews cost: images/s of streamed generation with previews on against off, on one server, side by side.

    python -m bench.bench_previews                          # a tiny random 384 px checkpoint (written here), c=8
    python -m bench.bench_previews --previews 8 --requests 32 --repeats 3
    python -m bench.bench_previews --model deepseek-community/Janus-Pro-1B --device cuda --requests 64

1. The server: `janus-server serve` as a subprocess on free loopback ports (in-process queue), of `--model`, or
   by default of a tiny random checkpoint that `janus-server tiny-model --image-size 384` writes into a temporary
   folder (576 steps per image, as Janus-Pro's). `--preview-share` sets its JANUS_PREVIEW_SHARE (default: the
   server's own, 0.05). One warm-up request with previews first.
2. Rounds, alternating off and on (`--repeats` of each): `--requests` `/v1/generate` requests with
   `"stream": true`, n=1, each its own seed, at most `--concurrency` in flight; `"previews": 0` (off) or
   `--previews` (on). A round's images/s is its requests over its wall time, every event read.
3. Printed: each round, the mean images/s of each mode, on / off, and the previews the clients received per
   request (at most --previews; fewer when the decoder was busy or its share spent).

Everything stays on 127.0.0.1; the server is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench.bench_batch import tiny_checkpoint
from tests.support.servers import ServerProcess, start_server


async def one(client: httpx.AsyncClient, seed: int, previews: int) -> int:
    """One streamed request, read to its end; the previews it carried."""
    body = {"prompt": f"a red fox in the snow #{seed}", "seed": seed, "stream": True, "previews": previews}
    got, done = 0, False
    async with client.stream("POST", "/v1/generate", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                got += "preview" in event
                done = done or "images" in event
    if not done:
        raise RuntimeError(f"request {seed} ended without its images")
    return got


async def round_(url: str, requests: int, concurrency: int, previews: int, first_seed: int) -> tuple[float, float]:
    """(images/s, previews received per request)."""
    gate = asyncio.Semaphore(concurrency)

    async def gated(client: httpx.AsyncClient, seed: int) -> int:
        async with gate:
            return await one(client, seed, previews)

    async with httpx.AsyncClient(base_url=url, timeout=None) as client:
        started = time.perf_counter()
        counts = await asyncio.gather(*(gated(client, first_seed + i) for i in range(requests)))
        wall = time.perf_counter() - started
    return requests / wall, sum(counts) / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint (default: a tiny random one written here)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--image-size", type=int, default=384, help="of the tiny checkpoint: 64 or 384")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--previews", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="rounds of each mode, alternating")
    parser.add_argument("--preview-share", help="the server's JANUS_PREVIEW_SHARE (default: its own, 0.05)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = args.model or str(tiny_checkpoint(folder, args.image_size))
        env = {"JANUS_PREVIEW_SHARE": args.preview_share} if args.preview_share else {}
        server: ServerProcess = start_server(["serve", "--model", model, "--device", args.device,
                                              "--max-batch-size", str(max(args.concurrency, 1))], folder, env,
                                             ready_timeout=1800)
        try:
            asyncio.run(round_(server.url, 1, 1, args.previews, 10_000))  # warm-up
            rates: dict[str, list[float]] = {"off": [], "on": []}
            received = []
            for r in range(args.repeats):
                for mode, previews in (("off", 0), ("on", args.previews)):
                    rate, per_request = asyncio.run(round_(server.url, args.requests, args.concurrency, previews,
                                                           r * args.requests))
                    rates[mode].append(rate)
                    if previews:
                        received.append(per_request)
                    print(f"round {r + 1} previews {mode:3}: {rate:.3f} images/s"
                          + (f", {per_request:.2f} previews per request" if previews else ""), flush=True)
        finally:
            server.stop()
    off, on = statistics.mean(rates["off"]), statistics.mean(rates["on"])
    print(f"\n{args.requests} requests per round, {args.concurrency} in flight, previews={args.previews}, "
          f"preview share {args.preview_share or 'default (0.05)'}, {args.device}")
    print(f"previews off: {off:.3f} images/s   on: {on:.3f} images/s   on / off = {on / off:.3f} "
          f"({(on / off - 1) * 100:+.1f}%)   previews received per request: {statistics.mean(received):.2f}")


if __name__ == "__main__":
    main()
