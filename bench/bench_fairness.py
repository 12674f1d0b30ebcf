"""Fair sharing across API keys: two keys flood the server while a third sends one request every 2 s.

    PYTHONPATH=. .venv/bin/python bench/bench_fairness.py                        # this checkout
    PYTHONPATH=. .venv/bin/python bench/bench_fairness.py --before /tmp/wt-old   # and an older one, side by side
    PYTHONPATH=. .venv/bin/python bench/bench_fairness.py --queue redis          # over Redis, one worker process

One `janus-server serve` on the tiny model (in-process queue, three keys in JANUS_API_KEY). First the third
key alone: `--probes` understanding requests (greedy, 16 new tokens), one every `--interval` s, on an idle
server. Then the same probes while keys one and two each keep `--flood` requests of the same kind in flight.
Prints the probe's p50 / p95 time to first token and whole-request latency, idle and under the flood, and
their ratio (the issue's bound: p95 under the flood within 2x of idle). The first token shows the wait for a
turn, which fair dispatch decides; the whole request also pays for sharing the batch with the flood, which on
a CPU (where a step's cost grows with its rows) no dispatch order can avoid. With `--before DIR` the same run
against another checkout's server code (e.g. a worktree of the commit before fair dispatch: first come, first
served), and the ratio between the two.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.bench_redis_load import start_serve
from tests.support.images import b64, png_bytes
from tests.support.servers import free_port

REPO = Path(__file__).resolve().parents[1]
KEYS = ("flood-one", "flood-two", "probe")
BODY = {"prompt": "Describe it", "images": [b64(png_bytes())], "max_new_tokens": 16}


async def post(client: httpx.AsyncClient, key: str) -> float:
    started = time.perf_counter()
    r = await client.post("/v1/understand", json=BODY, headers={"Authorization": f"Bearer {key}"})
    r.raise_for_status()
    return time.perf_counter() - started


async def probe(client: httpx.AsyncClient) -> tuple[float, float]:
    """(seconds to the first streamed token, seconds to the end) of one probe request."""
    started = time.perf_counter()
    first = None
    async with client.stream("POST", "/v1/understand", json={**BODY, "stream": True},
                             headers={"Authorization": "Bearer probe"}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if first is None and line.startswith("data:"):
                first = time.perf_counter() - started
    return first or 0.0, time.perf_counter() - started


async def probes(client: httpx.AsyncClient, count: int, interval: float) -> list[tuple[float, float]]:
    tasks = []
    for _ in range(count):
        tasks.append(asyncio.create_task(probe(client)))
        await asyncio.sleep(interval)
    return list(await asyncio.gather(*tasks))


async def flood(client: httpx.AsyncClient, key: str, width: int, stop: asyncio.Event) -> int:
    done = 0

    async def one_lane() -> None:
        nonlocal done
        while not stop.is_set():
            await post(client, key)
            done += 1

    await asyncio.gather(*(one_lane() for _ in range(width)))
    return done


async def run(url: str, args: argparse.Namespace) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=4 * args.flood, max_keepalive_connections=4 * args.flood)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await probe(client)  # warm-up
        idle = await probes(client, args.probes, args.interval)
        stop = asyncio.Event()
        floods = [asyncio.create_task(flood(client, key, args.flood, stop)) for key in KEYS[:2]]
        await asyncio.sleep(args.interval)  # let the flood fill the queue first
        loaded = await probes(client, args.probes, args.interval)
        stop.set()
        flooded = sum(await asyncio.gather(*floods))
    return {"idle": idle, "loaded": loaded, "flooded": flooded}


def p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def measure(tree: Path, model: Path, args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    redis_server = None
    queue = "memory"
    if args.queue == "redis":  # a private redis-server (nothing on disk) per side
        from tests.support.redis_fixture import RedisServer

        redis_server = RedisServer(free_port(), Path(tempfile.mkdtemp(dir=log_dir)))
        redis_server.start()
        queue = redis_server.url
    try:
        server = start_serve(tree, model, queue, log_dir, 1,
                             {"JANUS_API_KEY": ",".join(KEYS), "JANUS_ACCESS_LOG": "false"})
        try:
            return asyncio.run(run(server.url, args))
        finally:
            server.stop()
    finally:
        if redis_server is not None:
            redis_server.kill()


def report(name: str, r: dict[str, Any]) -> float:
    """Prints time to the first token (the wait for a turn: what fair dispatch decides) and the whole request
    (which also pays for sharing the engine's batch), p50 and p95, idle and flooded."""
    for what, index in (("first token", 0), ("whole request", 1)):
        idle = [t[index] for t in r["idle"]]
        loaded = [t[index] for t in r["loaded"]]
        print(f"{name:>8} {what:>13}: p50 {p(idle, 50):6.3f} s idle, {p(loaded, 50):6.3f} s flooded; "
              f"p95 {p(idle, 95):6.3f} s idle, {p(loaded, 95):6.3f} s flooded: {p(loaded, 95) / p(idle, 95):5.1f}x")
    print(f"{name:>8}: {r['flooded']} flood requests answered meanwhile")
    return p([t[1] for t in r["loaded"]], 95)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flood", type=int, default=64, help="requests each flooding key keeps in flight")
    parser.add_argument("--probes", type=int, default=10)
    parser.add_argument("--interval", type=float, default=2.0)
    parser.add_argument("--before", type=Path, help="another checkout to measure the same way")
    parser.add_argument("--queue", choices=["memory", "redis"], default="memory",
                        help="redis: serve --queue redis://... --workers 1 over a private redis-server")
    args = parser.parse_args()
    from bench.models import write_model

    log_dir = Path(tempfile.mkdtemp(prefix="bench-fairness-"))
    model = write_model(log_dir / "tiny", "tiny")
    ours = report("this", measure(REPO, model, args, log_dir))
    if args.before:
        theirs = report("before", measure(args.before.resolve(), model, args, log_dir))
        print(f"flooded probe p95: this checkout {ours:.2f} s, before {theirs:.2f} s ({theirs / ours:.1f}x faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
