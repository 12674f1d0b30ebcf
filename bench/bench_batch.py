"""`janus-server batch --url` against the same image requests sent one at a time over REST, on one server.

    python -m bench.bench_batch                              # a tiny random checkpoint (written here), 32 images
    python -m bench.bench_batch --requests 64 --concurrency 16 --max-batch-size 16
    python -m bench.bench_batch --model deepseek-community/Janus-Pro-1B --device cuda --requests 64

1. The server: `janus-server serve` as a subprocess on free loopback ports (in-process queue, one engine,
   `--max-batch-size`), of `--model`, or by default of a tiny random checkpoint that `janus-server tiny-model`
   writes into a temporary folder (`--image-size` 64: 16 image tokens; 384: Janus-Pro's 576), so it runs anywhere.
   One warm-up request first.
2. The batch: a file of `--requests` lines, each `/v1/images/generations` with n=1 and its own seed; timed from
   starting `janus-server batch INPUT --output OUT --url URL --concurrency C` to its exit (process start-up
   included), with the images/s its own summary line reports beside.
3. The same requests, one at a time: a loop of httpx posts to the same route, each waiting for its answer.

Images/s of each, and batch over one-at-a-time. Everything stays on 127.0.0.1; the server is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests.support.servers import ServerProcess, start_server

ROUTE = "/v1/images/generations"


def bodies(count: int) -> list[dict]:
    return [{"prompt": f"a red fox in the snow #{i}", "n": 1, "seed": i} for i in range(count)]


def write_input(path: Path, count: int) -> None:
    lines = [{"custom_id": f"image-{i}", "method": "POST", "url": ROUTE, "body": body}
             for i, body in enumerate(bodies(count))]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def tiny_checkpoint(folder: Path, image_size: int) -> Path:
    out = folder / f"tiny-{image_size}"
    subprocess.run([sys.executable, "-m", "server.cli", "tiny-model", str(out), "--image-size", str(image_size)],
                   check=True, capture_output=True, timeout=300)
    return out


def run_batch(server: ServerProcess, folder: Path, count: int, concurrency: int) -> tuple[float, str]:
    """(wall seconds of the whole command, its summary line)."""
    source, output = folder / "in.jsonl", folder / "out.jsonl"
    write_input(source, count)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "server.cli", "batch", str(source), "--output", str(output),
                             "--url", server.url, "--concurrency", str(concurrency)],
                            capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"batch exited with {result.returncode}: {result.stderr[-2000:]}")
    answers = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(answers) == count and all(a["response"]["status_code"] == 200 for a in answers), "a request failed"
    return seconds, result.stderr.strip().splitlines()[-1]


def run_one_at_a_time(server: ServerProcess, count: int) -> float:
    with httpx.Client(base_url=server.url, timeout=3600) as client:
        started = time.perf_counter()
        for body in bodies(count):
            response = client.post(ROUTE, json=body)
            response.raise_for_status()
        return time.perf_counter() - started


def row(name: str, seconds: float | str, rate: float | str) -> str:
    def cell(value: float | str) -> str:
        return f"{value:>10.2f}" if isinstance(value, float) else f"{value:>10}"

    return f"{name:<36}{cell(seconds)}{cell(rate)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory or hub id (default: a tiny random one written here)")
    parser.add_argument("--image-size", type=int, default=64, help="the tiny checkpoint's image size: 64 or 384")
    parser.add_argument("--requests", type=int, default=32, help="image requests in the file (n=1 each)")
    parser.add_argument("--concurrency", type=int, default=16, help="batch --concurrency (its default with --url: 16)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="the server's --max-batch-size")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="janus-bench-batch-") as tmp:
        folder = Path(tmp)
        model = args.model or str(tiny_checkpoint(folder, args.image_size))
        server = start_server(["serve", "--model", model, "--device", args.device, "--dtype", args.dtype,
                               "--max-batch-size", str(args.max_batch_size), "--log-level", "warning"], folder,
                              {"JANUS_MAX_QUEUE_DEPTH": str(max(256, 2 * args.concurrency))}, ready_timeout=1800)
        try:
            httpx.post(server.url + ROUTE, json={"prompt": "warm-up", "n": 1, "seed": 0},
                       timeout=3600).raise_for_status()
            print(f"# {args.requests} image requests (n=1, a seed each) to {ROUTE} of `janus-server serve --model "
                  f"{model}` ({args.device}, --max-batch-size {args.max_batch_size}); cpus {os.cpu_count()}, "
                  f"load average {os.getloadavg()[0]:.1f}")
            batch_s, summary = run_batch(server, folder, args.requests, args.concurrency)
            single_s = run_one_at_a_time(server, args.requests)
        except Exception:
            print(server.log()[-3000:], file=sys.stderr)
            raise
        finally:
            server.stop()
    reported = re.search(r"([\d.]+) images/s", summary)
    print(row("", "seconds", "images/s"))
    print(row(f"janus-server batch --concurrency {args.concurrency}", batch_s, args.requests / batch_s))
    print(row("one request at a time (httpx)", single_s, args.requests / single_s))
    print(f"batch / one at a time: {single_s / batch_s:.2f}x images/s (the batch's own summary: "
          f"{reported.group(1) if reported else '?'} images/s, without its start-up)")
    print(f"batch summary: {summary}")


if __name__ == "__main__":
    main()
