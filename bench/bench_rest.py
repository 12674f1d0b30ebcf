"""REST benchmark: janus-server over HTTP against transformers one request at a time, in one run.

    PYTHONPATH=. python bench/bench_rest.py --shape mid                  # the issue's figures, ~10 min on 2 cores
    PYTHONPATH=. python bench/bench_rest.py --shape tiny --quick         # a smoke run in well under a minute
    PYTHONPATH=. python bench/bench_rest.py --shape mid --concurrency 1,4,8,16
    PYTHONPATH=. python bench/bench_rest.py --shape mid --before /tmp/before   # also a server from another tree

With `--before DIR` (a worktree of an earlier commit: `git worktree add /tmp/before HEAD~1`), the same
measurements run against a server started from DIR's code too, one server at a time (before, then this
tree), and the summary prints this tree's figures over DIR's.

1. Reference (this process, before the server starts, so the two never share the CPU):
   transformers' `generate(generation_mode="image")` and greedy text `generate`, one request at a
   time, timed on `--ref-requests` requests; TTFT of one question about a fresh image.
2. Server: `janus-server serve --model DIR --grpc-port 0` as a subprocess on a free loopback port
   (in-process queue, one engine, `--max-batch-size` = the highest concurrency so c requests batch).
   At each concurrency c, c requests are sent together over HTTP (httpx) and timed until the last
   answer: generation images/s (n=1, temperature 1, CFG 5, a seed per request) and understanding
   tokens/s (a fresh image per request, `--max-new-tokens` greedy tokens). Second question: with
   `stream: true`, time to the first SSE event of a question about a fresh image (no reuse possible)
   and of a second question about that same image (prefix and vision-feature reuse).

With `--check N`: N questions about images of their own (greedy, `--check-tokens` tokens) are answered by
transformers one at a time first, then sent to the server together (so they share decode steps), and the
answers are compared as text: the greedy oracle over HTTP.

Ratios are server / reference at the same concurrency; the reference serves c requests one after
the other, so its rate does not depend on c. `x_hf_cpu` is the same ratio in CPU seconds (the
server process's, from /proc, against this process's for the reference): on a shared machine it
moves less than wall time. `batch` (mean requests per engine decode step, which shows that the c
requests really ran together) and `ms/step` (mean decode step) come from the server's /metrics.
Everything stays on 127.0.0.1; every request has a timeout and the server is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

from bench.models import cached_model
from bench.references import PROMPTS, hf_generate_image, hf_understand, percentile
from janus_core.models.loader import LoadedModel, load_model
from tests.support.servers import ServerProcess, free_port, wait_until_ready

DESCRIBE = "Describe this image in detail."
FOLLOW_UP = "What color is the car in the picture?"


# --- inputs -----------------------------------------------------------------------------------------


class Pictures:
    """Distinct random images (no two requests share one unless a test means them to), as PIL and PNG."""

    def __init__(self, size: int, seed: int = 1) -> None:
        self._rng = np.random.default_rng(seed)
        self.size = size

    def next(self) -> Image.Image:
        return Image.fromarray(self._rng.integers(0, 255, (self.size, self.size, 3), dtype=np.uint8))


def b64_png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


# --- reference side (in this process) ---------------------------------------------------------------


@dataclass
class Reference:
    image_seconds: float = float("nan")  # one image, one request at a time
    image_cpu: float = float("nan")
    tokens_per_s: float = float("nan")
    tokens_per_cpu_s: float = float("nan")
    ttft: float = float("nan")  # first question about a fresh image
    greedy: list[tuple[str, str]] = field(default_factory=list)  # the greedy check: (image as base64 PNG, text)


def greedy_references(lm: LoadedModel, count: int, max_new_tokens: int) -> list[tuple[str, str]]:
    """`count` (image, transformers' greedy answer to DESCRIBE) pairs on images of their own, one at a time."""
    pics, tokenizer = Pictures(lm.image_size, seed=7), lm.processor.tokenizer
    pairs = []
    for _ in range(count):
        image = pics.next()
        run = hf_understand(lm, [image], DESCRIBE, max_new_tokens=max_new_tokens)
        pairs.append((b64_png(image), tokenizer.decode(run.ids, skip_special_tokens=True)))
    return pairs


def measure_reference(lm: LoadedModel, pics: Pictures, kinds: set[str], requests: int,
                      max_new_tokens: int) -> Reference:
    ref = Reference()
    if "gen" in kinds:
        hf_generate_image(lm, PROMPTS[0], seed=0)  # warm-up
        wall, cpu = _timed(lambda: [hf_generate_image(lm, PROMPTS[i % len(PROMPTS)], seed=i) for i in range(requests)])
        ref.image_seconds, ref.image_cpu = wall / requests, cpu / requests
    if "und" in kinds or "prefix" in kinds:
        hf_understand(lm, [pics.next()], "hi", max_new_tokens=2)  # warm-up
    if "und" in kinds:
        runs = []
        wall, cpu = _timed(lambda: runs.extend(hf_understand(lm, [pics.next()], DESCRIBE, max_new_tokens=max_new_tokens)
                                               for _ in range(requests)))
        tokens = sum(r.tokens for r in runs)
        ref.tokens_per_s, ref.tokens_per_cpu_s = tokens / wall, tokens / cpu
    if "prefix" in kinds:
        ref.ttft = statistics.median(hf_understand(lm, [pics.next()], FOLLOW_UP, max_new_tokens=1).ttft
                                     for _ in range(max(requests, 1)))
    return ref


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


# --- the server -------------------------------------------------------------------------------------


def start_server(model_dir: Path, max_batch: int, args: argparse.Namespace, log_dir: Path,
                 tree: Path | None = None) -> ServerProcess:
    """`janus-server serve` on a free loopback port, gRPC off, batching up to `max_batch` requests; the code
    of `tree` when given (another checkout), else this one's."""
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "--model", str(model_dir), "--host", "127.0.0.1",
           "--port", str(port), "--grpc-port", "0", "--device", args.device, "--dtype", args.dtype,
           "--max-batch-size", str(max_batch), "--request-timeout", str(args.timeout), "--log-level", "warning"]
    if args.compile:
        cmd.append("--compile")
    if args.cuda_graphs:
        cmd.append("--cuda-graphs")
    # Metrics from engine stats are refreshed every heartbeat; 0.5 s keeps the batch figure current.
    env = {**os.environ, "JANUS_HEARTBEAT_INTERVAL": "0.5", "JANUS_MAX_QUEUE_DEPTH": str(4 * max_batch),
           "HF_HUB_OFFLINE": "1"}
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    log_path = log_dir / f"server-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tree)
    server = ServerProcess(proc=proc, log_path=log_path, port=port, grpc_port=0, env=env)
    wait_until_ready(server, timeout=300.0)
    return server


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc); NaN elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def histogram(metrics_text: str, name: str, kind: str) -> tuple[float, float]:
    """(sum, count) of the server's histogram `name{kind=...}` in Prometheus text."""
    found = {}
    for part in ("sum", "count"):
        match = re.search(rf'^{name}_{part}{{kind="{kind}"}} (\S+)$', metrics_text, re.MULTILINE)
        found[part] = float(match.group(1)) if match else 0.0
    return found["sum"], found["count"]


def step_figures(before: str, after: str, kind: str) -> tuple[float, float]:
    """(mean requests per decode step, mean seconds per decode step) between two /metrics scrapes."""
    means = []
    for name in ("janus_batch_size", "janus_decode_step_seconds"):
        (sum0, n0), (sum1, n1) = histogram(before, name, kind), histogram(after, name, kind)
        means.append((sum1 - sum0) / (n1 - n0) if n1 > n0 else float("nan"))
    return means[0], means[1]


@dataclass
class Round:
    """c requests sent together: each one's latency and what it produced, plus server-side figures."""

    latencies: list[float]
    produced: list[int]  # images or completion tokens per request
    makespan: float
    server_cpu: float
    batch: float  # mean requests per decode step during the round
    step_s: float  # mean seconds per decode step during the round


class Client:
    def __init__(self, server: ServerProcess, timeout: float) -> None:
        self.server = server
        self.http = httpx.AsyncClient(base_url=server.url, timeout=timeout,
                                      limits=httpx.Limits(max_connections=64, max_keepalive_connections=64))

    async def close(self) -> None:
        await self.http.aclose()

    async def round(self, kind: str, bodies: list[dict]) -> Round:
        """POST `bodies` together to the endpoint of `kind`; time each and the whole."""
        path = "/v1/generate" if kind == "generate" else "/v1/understand"
        before = (await self.http.get("/metrics")).text
        cpu = process_cpu_seconds(self.server.proc.pid)
        started = time.perf_counter()
        answers = await asyncio.gather(*(self._post(path, body, started) for body in bodies))
        makespan = time.perf_counter() - started
        cpu = process_cpu_seconds(self.server.proc.pid) - cpu
        await asyncio.sleep(1.0)  # one heartbeat, so /metrics has the round's steps
        batch, step_s = step_figures(before, (await self.http.get("/metrics")).text, kind)
        return Round([a[0] for a in answers], [a[1] for a in answers], makespan, cpu, batch, step_s)

    async def _post(self, path: str, body: dict, started: float) -> tuple[float, int]:
        data = await self.answer(path, body)
        produced = len(data["images"]) if "images" in data else data["usage"]["completion_tokens"]
        return time.perf_counter() - started, produced

    async def answer(self, path: str, body: dict) -> dict:
        """The JSON answer of a 200; RuntimeError naming the status and body otherwise."""
        resp = await self.http.post(path, json=body)
        if resp.status_code != 200:
            raise RuntimeError(f"{path} answered {resp.status_code}: {resp.text[:300]}")
        return resp.json()

    async def first_event(self, body: dict) -> float:
        """Seconds from sending a streaming understand request to its first SSE data event."""
        started = time.perf_counter()
        first = float("nan")
        async with self.http.stream("POST", "/v1/understand", json={**body, "stream": True}) as resp:
            if resp.status_code != 200:
                raise RuntimeError(f"/v1/understand answered {resp.status_code}: {(await resp.aread())[:300]!r}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                if first != first:  # NaN: nothing seen yet
                    first = time.perf_counter() - started
                payload = line[5:].strip()
                if payload != "[DONE]" and "error" in json.loads(payload):
                    raise RuntimeError(f"stream failed: {payload}")
        return first


# --- the three measurements -------------------------------------------------------------------------


def row(*cells) -> str:
    return "  ".join(f"{c:>11.3f}" if isinstance(c, float) else f"{c:>11}" for c in cells)


async def bench_generation(client: Client, ref: Reference, levels: list[int]) -> dict[int, float]:
    print(f"\n## generation over REST (n=1, temperature 1, CFG 5); transformers one at a time: "
          f"{1 / ref.image_seconds:.4f} images/s, {ref.image_cpu:.1f} CPU s/image")
    print(row("concurrency", "img/s", "x_hf", "p50_s", "p95_s", "x_hf_cpu", "batch", "ms/step"))
    ratios = {}
    for c in levels:
        bodies = [{"prompt": f"{PROMPTS[i % len(PROMPTS)]} #{i}", "n": 1, "cfg_weight": 5.0, "temperature": 1.0,
                   "seed": i} for i in range(c)]
        r = await client.round("generate", bodies)
        rate = sum(r.produced) / r.makespan
        ratios[c] = rate * ref.image_seconds
        print(row(c, rate, ratios[c], percentile(r.latencies, 50), percentile(r.latencies, 95),
                  ref.image_cpu * sum(r.produced) / r.server_cpu, r.batch, 1000 * r.step_s))
    return ratios


async def bench_understanding(client: Client, ref: Reference, pics: Pictures, levels: list[int],
                              max_new_tokens: int) -> dict[int, float]:
    print(f"\n## understanding over REST ({max_new_tokens} new tokens, greedy, a fresh {pics.size}px image per "
          f"request); transformers one at a time: {ref.tokens_per_s:.1f} tokens/s")
    print(row("concurrency", "tok/s", "x_hf", "p50_s", "p95_s", "x_hf_cpu", "batch", "ms/step"))
    ratios = {}
    for c in levels:
        bodies = [{"prompt": DESCRIBE, "images": [b64_png(pics.next())], "max_new_tokens": max_new_tokens,
                   "temperature": 0.0} for _ in range(c)]
        r = await client.round("understand", bodies)
        rate = sum(r.produced) / r.makespan
        ratios[c] = rate / ref.tokens_per_s
        print(row(c, rate, ratios[c], percentile(r.latencies, 50), percentile(r.latencies, 95),
                  sum(r.produced) / r.server_cpu / ref.tokens_per_cpu_s, r.batch, 1000 * r.step_s))
    return ratios


async def bench_second_question(client: Client, ref: Reference, pics: Pictures, trials: int) -> float:
    """Median TTFT of a first question about a fresh image over that of a second question about it."""
    first, second = [], []
    for _ in range(trials):
        image = b64_png(pics.next())
        first.append(await client.first_event({"prompt": DESCRIBE, "images": [image], "max_new_tokens": 1}))
        second.append(await client.first_event({"prompt": FOLLOW_UP, "images": [image], "max_new_tokens": 1}))
    t_first, t_second = statistics.median(first), statistics.median(second)
    print(f"\n## second question on the same image over REST (TTFT = first SSE event, median of {trials})")
    print(row("first_s", "second_s", "first/second", "hf_first_s", "hf/second"))
    print(row(t_first, t_second, t_first / t_second, ref.ttft, ref.ttft / t_second))
    return t_first / t_second


async def greedy_check(client: Client, ref: Reference, max_new_tokens: int) -> int:
    """Send the greedy check's questions together (one batch) and count answers equal to transformers'."""
    bodies = [{"prompt": DESCRIBE, "images": [image], "max_new_tokens": max_new_tokens, "temperature": 0.0}
              for image, _ in ref.greedy]
    answers = await asyncio.gather(*(client.answer("/v1/understand", body) for body in bodies))
    equal = 0
    print(f"\n## greedy check over REST: {len(bodies)} questions sent together, {max_new_tokens} tokens, "
          "against transformers one at a time")
    for i, (answer, (_, expected)) in enumerate(zip(answers, ref.greedy, strict=True)):
        got = answer["text"]
        if got == expected:
            equal += 1
            continue
        pairs = enumerate(zip(got, expected, strict=False))
        same = next((k for k, (a, b) in pairs if a != b), min(len(got), len(expected)))
        print(f"request {i}: differs from character {same}: {got[same:same + 40]!r} vs {expected[same:same + 40]!r}")
    print(f"{equal}/{len(bodies)} answers equal transformers' greedy text")
    return equal


async def bench_server(server: ServerProcess, ref: Reference, pics: Pictures, args: argparse.Namespace,
                       levels: list[int], kinds: set[str]) -> dict[str, float]:
    """Every figure, named as the summary prints it (ratios over transformers)."""
    client = Client(server, args.timeout)
    summary: dict[str, float] = {}
    try:
        # Warm-up: the first forward passes of a fresh process pay one-off allocation costs.
        await client.round("understand", [{"prompt": "hi", "images": [b64_png(pics.next())], "max_new_tokens": 2}])
        if ref.greedy:
            await greedy_check(client, ref, args.check_tokens)
        if "gen" in kinds:
            r = await bench_generation(client, ref, levels)
            summary |= {f"generation images/s vs transformers at c={c}": x for c, x in r.items()}
        if "und" in kinds:
            r = await bench_understanding(client, ref, pics, levels, args.max_new_tokens)
            summary |= {f"understanding tokens/s vs transformers at c={c}": x for c, x in r.items()}
        if "prefix" in kinds:
            x = await bench_second_question(client, ref, pics, args.prefix_trials)
            summary["second-question TTFT, first/second"] = x
    finally:
        await client.close()
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="mid", help="tiny | mid | janus-pro-1b | janus-pro-7b")
    parser.add_argument("--model-dir", help="checkpoint directory (default: a random one of --shape, cached)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--concurrency", default="8", help="comma-separated, e.g. 1,4,8,16")
    parser.add_argument("--ref-requests", type=int, default=2, help="one-at-a-time reference requests timed")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--prefix-trials", type=int, default=3)
    parser.add_argument("--only", default="gen,und,prefix")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per HTTP request")
    parser.add_argument("--compile", action="store_true", help="pass --compile to the server (CUDA)")
    parser.add_argument("--cuda-graphs", action="store_true", help="pass --cuda-graphs to the server (CUDA)")
    parser.add_argument("--quick", action="store_true", help="concurrency 1,4; 16 new tokens; 1 reference")
    parser.add_argument("--before", type=Path, help="another checkout: measure a server from its code too")
    parser.add_argument("--check", type=int, default=0,
                        help="greedy check: this many questions sent together, against transformers (default 0: off)")
    parser.add_argument("--check-tokens", type=int, default=32, help="new tokens per greedy check question")
    args = parser.parse_args()
    if args.quick:
        args.concurrency, args.max_new_tokens, args.ref_requests = "1,4", 16, 1
    levels = [int(c) for c in args.concurrency.split(",")]
    kinds = set(args.only.split(","))
    path = cached_model(args.shape, args.model_dir)
    lm = load_model(str(path), args.device, args.dtype)
    pics = Pictures(lm.image_size)
    print(f"# {args.shape} at {path}: {sum(p.numel() for p in lm.model.parameters()) / 1e6:.1f}M parameters, "
          f"{lm.device} ({lm.dtype}), torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    ref = measure_reference(lm, pics, kinds, args.ref_requests, args.max_new_tokens)
    ref.greedy = greedy_references(lm, args.check, args.check_tokens)
    del lm  # the server loads its own copy
    trees = ([("before", args.before)] if args.before else []) + [("this tree", None)]
    figures: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="janus-bench-rest-") as logs:
        for name, tree in trees:
            if args.before:
                print(f"\n# server from {name}{f' ({tree})' if tree else ''}")
            server = start_server(path, max(levels), args, Path(logs), tree)
            try:
                figures[name] = asyncio.run(bench_server(server, ref, pics, args, levels, kinds))
            except Exception:
                print(server.log()[-3000:], file=sys.stderr)
                raise
            finally:
                server.stop()
    print(f"\n## summary (load average now {os.getloadavg()[0]:.1f}; targets at mid-size, CPU, c=8: "
          f"generation >= 4x, understanding >= 3x, second-question TTFT >= 3x)")
    for key, x in figures["this tree"].items():
        line = f"{key}: {x:.2f}x"
        if args.before:
            line += f"  (before {figures['before'][key]:.2f}x; this tree / before {x / figures['before'][key]:.3f})"
        print(line)


if __name__ == "__main__":
    main()
