"""Redis mode under load: mixed requests through `janus-server serve --queue redis://… --workers 2` on the tiny
model. Every request must be answered; reports p50/p95/p99 end-to-end latency and the peak number of
clients Redis saw (`INFO clients`, sampled every 50 ms), which shows whether connections grow with the
requests in flight.

    PYTHONPATH=. .venv/bin/python bench/bench_redis_load.py                       # 1,000 requests at c=250
    PYTHONPATH=. .venv/bin/python bench/bench_redis_load.py --before /tmp/wt-old  # and an older checkout

Each side gets a private `redis-server` (nothing on disk) on a free port and its own `serve` (gRPC off,
two workers, `OMP_NUM_THREADS=1` each, queue depth 512 so that admission never refuses); the client
is `bench/load.py`'s request mix (understanding: greedy, 16 new tokens, a few distinct images;
generation: n=1, seeded). `--before DIR` runs the same load against the server code of another
checkout (a worktree of an earlier commit), with the same model, side by side, and prints the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import redis.asyncio

from bench.bench_rest import process_cpu_seconds
from bench.load import KINDS, Options, drive, fmt, summarise
from tests.support.redis_fixture import RedisServer
from tests.support.servers import ServerProcess, free_port, wait_until_ready

REPO = Path(__file__).resolve().parents[1]


def start_serve(tree: Path, model: Path, queue_url: str, log_dir: Path, workers: int,
                env: dict[str, str] | None = None) -> ServerProcess:
    """`serve` from the checkout `tree` on `queue_url` (`memory` too), ready; `env` adds to its environment."""
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "--model", str(model), "--queue", queue_url,
           "--workers", str(workers), "--host", "127.0.0.1", "--port", str(port), "--grpc-port", "0",
           "--metrics-port", str(free_port()), "--log-level", "warning"]
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "JANUS_MAX_QUEUE_DEPTH": "512", "JANUS_REQUEST_TIMEOUT": "600", **(env or {})}
    log_path = log_dir / f"serve-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tree)
    server = ServerProcess(proc=proc, log_path=log_path, port=port, grpc_port=0, env=env)
    wait_until_ready(server, timeout=300.0)
    return server


async def load_and_watch(opts: Options, redis_url: str) -> tuple[list[Any], float, int]:
    """Drive the load; meanwhile sample Redis' connected clients. -> (samples, wall seconds, peak clients)."""
    client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, int((await client.info("clients"))["connected_clients"]))
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch())
    try:
        samples, wall = await drive(opts)
    finally:
        watcher.cancel()
        await client.aclose()
    return samples, wall, peak - 1  # not counting the watcher's own connection


def measure(tree: Path, model: Path, args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    redis_server = RedisServer(free_port(), Path(tempfile.mkdtemp(dir=log_dir)))
    redis_server.start()
    try:
        server = start_serve(tree, model, redis_server.url, log_dir, args.workers)
        try:
            opts = Options(server.url, args.requests, 1e9, args.concurrency, 0.5, args.max_new_tokens, 600.0, (),
                           False)
            cpu = process_cpu_seconds(server.proc.pid)
            samples, wall, peak = asyncio.run(load_and_watch(opts, redis_server.url))
            cpu = process_cpu_seconds(server.proc.pid) - cpu  # the frontend (REST + queue); workers are children
        finally:
            server.stop()
    finally:
        redis_server.kill()
    report = summarise(samples, wall, {}, {})
    report["peak_redis_clients"] = peak
    report["frontend_cpu_s"] = cpu
    return report


def rows(name: str, report: dict[str, Any]) -> list[str]:
    out = []
    for kind in (*KINDS, "all"):
        r = report["kinds"].get(kind)
        if r is None:
            continue
        failed = ", ".join(f"{n} x {status}" for status, n in sorted(r["failed"].items())) or "0"
        out.append(f"| {name} | {kind} | {r['ok']} / {r['sent']} | {failed} | {fmt(r['throughput_rps'], digits=1)} | "
                   f"{fmt(r['p50_s'], digits=2)} | {fmt(r['p95_s'], digits=2)} | {fmt(r['p99_s'], digits=2)} | "
                   f"{report['peak_redis_clients'] if kind == 'all' else ''} | "
                   f"{fmt(report['frontend_cpu_s'], digits=1) if kind == 'all' else ''} |")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=250)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=64, choices=(64, 384), help="the tiny model's image size")
    parser.add_argument("--before", type=Path, help="another checkout whose server code to measure side by side")
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        print("redis-server is not installed", file=sys.stderr)
        return 1
    from janus_core.tiny.janus import write_tiny_model
    from server.logs import quiet_libraries

    quiet_libraries()
    log_dir = Path(tempfile.mkdtemp(prefix="bench-redis-load-"))
    model = write_tiny_model(log_dir / "model", "hf", seed=0, image_size=args.image_size)
    sides = [("this checkout", REPO)] + ([("before", args.before.resolve())] if args.before else [])
    reports = {name: measure(tree, model, args, log_dir) for name, tree in sides}
    print(f"# {args.requests} mixed requests at concurrency {args.concurrency}, serve --workers {args.workers}, "
          f"tiny model ({args.image_size} px), CPU; logs in {log_dir}")
    print("| server | kind | answered 200 | failed (status) | req/s | p50 s | p95 s | p99 s | peak Redis clients | "
          "frontend CPU s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, report in reports.items():
        print("\n".join(rows(name, report)))
    for name, report in reports.items():
        for error in report["kinds"]["all"]["errors"]:
            print(f"{name}: no HTTP answer: {error}")
    if args.before:
        after, before = reports["this checkout"], reports["before"]
        a, b = after["kinds"]["all"], before["kinds"]["all"]
        print(f"ratios before / this checkout: p95 x{b['p95_s'] / a['p95_s']:.2f}, p99 x{b['p99_s'] / a['p99_s']:.2f}, "
              f"peak Redis clients x{before['peak_redis_clients'] / max(after['peak_redis_clients'], 1):.2f}, "
              f"failed {b['sent'] - b['ok']} vs {a['sent'] - a['ok']}")
    return 0 if all(r["kinds"]["all"]["ok"] == r["kinds"]["all"]["sent"] for r in reports.values()) else 2


if __name__ == "__main__":
    sys.exit(main())
