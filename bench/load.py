"""Load test for a running janus-server API: throughput and end-to-end latency through API -> queue -> workers.

    python bench/load.py http://127.0.0.1:8000 --requests 200 --concurrency 32 \\
        --worker-metrics http://127.0.0.1:9100 --worker-metrics http://127.0.0.1:9101

Sends a mix of understanding requests (greedy, `--max-new-tokens`, one of a few distinct images) and
generation requests (n=1, seeded), at most `--concurrency` at a time, until `--requests` have been
sent or `--duration` seconds have passed; then waits for those in flight (each bounded by
`--timeout`) and prints, per kind and overall: completed / failed (by status), throughput, and
p50 / p95 / p99 / mean end-to-end latency as the client saw it.

Queue time vs run time: workers record `janus_queue_wait_seconds{kind}` (from the frontend creating
the job to a worker starting it) on their /metrics. The script scrapes every `--worker-metrics` URL
before and after the run; the difference of the histogram's _sum / _count is the mean queue wait of
the jobs that started during the run. "run" is mean end-to-end minus mean queue wait: the engine time
plus the trip back through Redis and HTTP. The same scrape gives the mean engine batch size
(`janus_batch_size{kind}`). Without `--worker-metrics` only end-to-end figures are reported.

Loopback targets only (127.0.0.1, ::1, localhost): this is for measuring your own server.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import ipaddress
import json
import math
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

KINDS = ("understand", "generate")


@dataclass(frozen=True)
class Options:
    url: str
    requests: int
    duration: float
    concurrency: int
    generate_share: float
    max_new_tokens: int
    timeout: float
    worker_metrics: tuple[str, ...]
    as_json: bool


@dataclass(frozen=True)
class Sample:
    kind: str
    status: int
    seconds: float
    tokens: int = 0  # completion tokens (understanding)
    images: int = 0  # images returned (generation)
    error: str = ""  # status 0: the client's exception (no HTTP answer)


@dataclass
class Histogram:
    """_sum and _count of one Prometheus histogram, summed over workers, per kind label."""

    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)

    def mean_since(self, before: Histogram, kind: str) -> float | None:
        count = self.counts.get(kind, 0.0) - before.counts.get(kind, 0.0)
        return (self.sums.get(kind, 0.0) - before.sums.get(kind, 0.0)) / count if count > 0 else None


# --- arguments ---------------------------------------------------------------------------------------


def require_loopback(url: str) -> str:
    host = urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SystemExit(f"refusing {url!r}: load tests target loopback only (127.0.0.1, ::1, localhost)")
    return url.rstrip("/")


def parse_args(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("url", help="the API's base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--requests", type=int, default=200, help="requests to send (default 200)")
    p.add_argument("--duration", type=float, default=60.0, help="stop sending after this many seconds (default 60)")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight at once (default 32)")
    p.add_argument("--generate-share", type=float, default=0.5, help="fraction that are generation (default 0.5)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens per understanding request (default 32)")
    p.add_argument("--timeout", type=float, default=300.0, help="per-request client timeout in seconds")
    p.add_argument("--worker-metrics", action="append", default=[], metavar="URL",
                   help="a worker's metrics base URL (repeat per worker) for queue-wait and batch figures")
    p.add_argument("--json", action="store_true", dest="as_json", help="print the report as JSON")
    a = p.parse_args(argv)
    if a.requests < 1 or a.concurrency < 1 or a.duration <= 0 or not 0.0 <= a.generate_share <= 1.0:
        p.error("--requests and --concurrency must be >= 1, --duration > 0, --generate-share in [0, 1]")
    return Options(require_loopback(a.url), a.requests, a.duration, a.concurrency, a.generate_share,
                   a.max_new_tokens, a.timeout, tuple(require_loopback(u) for u in a.worker_metrics), a.as_json)


# --- requests ----------------------------------------------------------------------------------------


def sample_images(count: int = 8, side: int = 96) -> list[str]:
    """A few distinct noise images (base64 PNG), so the vision cache does not answer every request."""
    rng = random.Random(0)
    images = []
    for _ in range(count):
        buf = io.BytesIO()
        Image.frombytes("RGB", (side, side), rng.randbytes(side * side * 3)).save(buf, format="PNG")
        images.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return images


def build_request(i: int, opts: Options, images: list[str]) -> tuple[str, str, dict[str, Any]]:
    """(kind, path, JSON body) of request number i; the mix is deterministic for a given i."""
    if random.Random(i).random() < opts.generate_share:
        return "generate", "/v1/generate", {"prompt": f"a watercolour of landmark {i % 50}", "seed": i}
    return "understand", "/v1/understand", {"prompt": f"Question {i % 20}: what is in this image?",
                                            "images": [images[i % len(images)]],
                                            "max_new_tokens": opts.max_new_tokens}


async def send(http: httpx.AsyncClient, opts: Options, i: int, images: list[str]) -> Sample:
    kind, path, body = build_request(i, opts, images)
    started = time.perf_counter()
    try:
        r = await http.post(opts.url + path, json=body)
    except httpx.HTTPError as exc:  # status 0: no HTTP answer
        return Sample(kind, 0, time.perf_counter() - started, error=f"{type(exc).__name__}: {exc}")
    seconds = time.perf_counter() - started
    if r.status_code != 200:
        return Sample(kind, r.status_code, seconds)
    data = r.json()
    if kind == "understand":
        return Sample(kind, 200, seconds, tokens=data["usage"]["completion_tokens"])
    return Sample(kind, 200, seconds, images=len(data["images"]))


async def drive(opts: Options) -> tuple[list[Sample], float]:
    """Keep `concurrency` requests in flight until the count or the time is used up; wait for the rest."""
    images = sample_images()
    limits = httpx.Limits(max_connections=opts.concurrency, max_keepalive_connections=opts.concurrency)
    async with httpx.AsyncClient(timeout=opts.timeout, limits=limits) as http:
        slots = asyncio.Semaphore(opts.concurrency)
        started = time.perf_counter()
        tasks: list[asyncio.Task[Sample]] = []

        async def one(i: int) -> Sample:
            try:
                return await send(http, opts, i, images)
            finally:
                slots.release()

        for i in range(opts.requests):
            await slots.acquire()
            if time.perf_counter() - started > opts.duration:
                slots.release()
                break
            tasks.append(asyncio.create_task(one(i)))
        samples = list(await asyncio.gather(*tasks))
        return samples, time.perf_counter() - started


# --- worker metrics ----------------------------------------------------------------------------------


def scrape(urls: tuple[str, ...]) -> dict[str, Histogram]:
    """Queue-wait and batch-size histograms (_sum, _count per kind), summed over the workers."""
    hists = {name: Histogram() for name in ("janus_queue_wait_seconds", "janus_batch_size")}
    for url in urls:
        text = httpx.get(url + "/metrics", timeout=10.0).text
        for family in text_string_to_metric_families(text):
            hist = hists.get(family.name)
            for s in family.samples if hist is not None else ():
                into = {f"{family.name}_sum": hist.sums, f"{family.name}_count": hist.counts}.get(s.name)
                if into is not None:
                    kind = s.labels.get("kind", "")
                    into[kind] = into.get(kind, 0.0) + s.value
    return hists


# --- report ------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (q in [0, 100])."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarise(samples: list[Sample], wall: float, queue_wait: dict[str, float | None],
              batch: dict[str, float | None]) -> dict[str, Any]:
    report: dict[str, Any] = {"wall_seconds": round(wall, 3), "kinds": {}}
    for kind in (*KINDS, "all"):
        chosen = [s for s in samples if kind in ("all", s.kind)]
        if not chosen:
            continue
        ok = [s.seconds for s in chosen if s.status == 200]
        row: dict[str, Any] = {
            "sent": len(chosen), "ok": len(ok),
            "failed": dict(Counter(str(s.status) for s in chosen if s.status != 200)),
            "errors": sorted({s.error for s in chosen if s.error}),
            "throughput_rps": len(ok) / wall,
            **{f"p{q}_s": percentile(ok, q) for q in (50, 95, 99)},
            "mean_s": sum(ok) / len(ok) if ok else math.nan,
        }
        if kind != "all":
            wait = queue_wait.get(kind)
            row["queue_wait_mean_s"] = wait
            row["run_mean_s"] = row["mean_s"] - wait if wait is not None and ok else None
            row["batch_mean"] = batch.get(kind)
        report["kinds"][kind] = row
    report["images_per_s"] = sum(s.images for s in samples) / wall
    report["tokens_per_s"] = sum(s.tokens for s in samples) / wall
    return report


def fmt(value: Any, unit: float = 1.0, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value * unit:.{digits}f}"


def print_report(report: dict[str, Any]) -> None:
    print(f"wall {report['wall_seconds']:.1f} s   images/s {report['images_per_s']:.2f}   "
          f"tokens/s {report['tokens_per_s']:.1f}")
    header = ("kind", "sent", "ok", "failed", "req/s", "p50 s", "p95 s", "p99 s", "mean s", "queue s", "run s",
              "batch")
    print("  ".join(f"{h:>10}" for h in header))
    for kind, r in report["kinds"].items():
        failed = ",".join(f"{k}x{v}" for k, v in r["failed"].items()) or "0"
        cells = (kind, r["sent"], r["ok"], failed, fmt(r["throughput_rps"], digits=2), fmt(r["p50_s"]),
                 fmt(r["p95_s"]), fmt(r["p99_s"]), fmt(r["mean_s"]), fmt(r.get("queue_wait_mean_s")),
                 fmt(r.get("run_mean_s")), fmt(r.get("batch_mean"), digits=1))
        print("  ".join(f"{c!s:>10}" for c in cells))


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    ready = httpx.get(opts.url + "/ready", timeout=10.0)
    if ready.status_code != 200:
        print(f"{opts.url} is not ready ({ready.status_code}): {ready.text}", file=sys.stderr)
        return 1
    before = scrape(opts.worker_metrics)
    samples, wall = asyncio.run(drive(opts))
    time.sleep(1.0)  # workers fold engine statistics into their metrics at each heartbeat
    after = scrape(opts.worker_metrics)

    def means(name: str) -> dict[str, float | None]:
        return {k: after[name].mean_since(before[name], k) for k in KINDS}

    report = summarise(samples, wall, means("janus_queue_wait_seconds"), means("janus_batch_size"))
    if opts.as_json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0 if all(s.status == 200 for s in samples) else 2


if __name__ == "__main__":
    sys.exit(main())
