"""The hardened edge against a real server: named keys and their quotas, the key checked before the body,
bounded metric labels, image checks that cost bounded memory, remote images, malformed input as 4xx."""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import http.server
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
import zlib

import httpx
import numpy as np
import pytest
import redis
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.support import redis_fixture
from tests.support.images import b64, png_bytes
from tests.support.servers import spawn_worker, start_server, wait_http_ok, wait_until_ready

redis_server = redis_fixture.redis_server

IMAGE = b64(png_bytes())
SLOW = {"prompt": "Describe every detail", "images": [IMAGE], "max_new_tokens": 880, "stream": True}
KEYS = {"team-a": "secret-a", "team-b": "secret-b", "team-c": "secret-c", "ops": "secret-ops"}


def sha(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def keys_yaml(extra: str = "") -> str:
    return f"""keys:
  - {{name: team-a, sha256: {sha(KEYS["team-a"])}, max_in_flight: 1}}
  - {{name: team-b, sha256: {sha(KEYS["team-b"])}}}
  - {{name: team-c, sha256: {sha(KEYS["team-c"])}, images_per_minute: 2}}
  - {{name: ops, sha256: {sha(KEYS["ops"])}, requests_per_minute: 1000}}
{extra}"""


class ImageHost(http.server.ThreadingHTTPServer):
    """A real HTTP server on loopback serving one PNG at /ok.png and a stalled response at /slow.png."""

    def __init__(self) -> None:
        self.release = threading.Event()
        body = png_bytes()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(handler):  # noqa: N802
                if handler.path == "/slow.png":
                    self.release.wait(60)
                handler.send_response(200)
                handler.send_header("Content-Type", "image/png")
                if handler.path == "/gzip.png":
                    handler.send_header("Content-Encoding", "gzip")
                handler.send_header("Content-Length", str(len(body)))
                handler.end_headers()
                handler.wfile.write(body)

            def log_message(handler, *args):
                pass

        super().__init__(("127.0.0.2", 0), Handler)  # loopback, but not the address `localhost` names
        self.daemon_threads = True
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()


@pytest.fixture(scope="module")
def image_host():
    host = ImageHost()
    yield host
    host.release.set()
    host.shutdown()


@pytest.fixture(scope="module")
def keyed(tiny_hf_dir, tmp_path_factory, image_host):
    logs = tmp_path_factory.mktemp("edge")
    path = logs / "keys.yaml"
    path.write_text(keys_yaml())
    env = {"JANUS_API_KEYS_FILE": str(path), "JANUS_ALLOWED_IMAGE_HOSTS": "127.0.0.2,localhost",
           "JANUS_IMAGE_FETCH_TIMEOUT": "1", "JANUS_MAX_IMAGE_PIXELS": "40000000"}
    proc = start_server(["serve", "--model", str(tiny_hf_dir)], logs, env)
    proc.keys_path = path
    yield proc
    proc.stop()


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


def metrics(server) -> str:
    return httpx.get(server.url + "/metrics", headers=auth("ops"), timeout=30).text


def sample(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return 0.0


def status_of(pid: int) -> dict[str, float]:
    """VmRSS / VmHWM (kB) and CPU seconds of a process, from /proc."""
    fields: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(value.split()[0])
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read().rsplit(")", 1)[1].split()
    fields["cpu"] = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
    return fields


# --- keys -----------------------------------------------------------------------------------------------


def test_only_probes_and_the_playground_are_open(keyed):
    for path in ("/health", "/ready", "/", "/playground", "/playground/playground.js"):
        assert httpx.get(keyed.url + path).status_code == 200, path
    for path in ("/metrics", "/openapi.json", "/v1/models", "/v1/no-such-route"):
        r = httpx.get(keyed.url + path)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", path
    assert httpx.get(keyed.url + "/metrics", headers=auth("team-b")).status_code == 200
    for path in ("/docs", "/redoc"):  # their pages load scripts from a CDN: not served at all
        assert httpx.get(keyed.url + path, headers=auth("team-b")).status_code == 404


def test_the_key_is_checked_before_the_body_is_read(keyed):
    """A client without a key announcing 30 MiB gets its 401 after sending 1 KiB: the server never waits for
    (or parses) the rest."""
    before = status_of(keyed.proc.pid)
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", keyed.port), timeout=10) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 31457280\r\n\r\n" + b"[" * 1024)
            reply = sock.recv(4096).decode(errors="replace")
        assert reply.startswith("HTTP/1.1 401"), reply
    assert status_of(keyed.proc.pid)["cpu"] - before["cpu"] < 1.0


def test_over_a_quota_is_429_with_retry_after_and_counted_by_name(keyed):
    with httpx.Client(base_url=keyed.url, timeout=120) as client, \
            client.stream("POST", "/v1/understand", json=SLOW, headers=auth("team-a")) as held:
        assert held.status_code == 200
        lines = held.iter_lines()  # kept: dropping the iterator would close the response
        next(lines)  # team-a's one request in flight is running
        refused = client.post("/v1/understand", json=SLOW, headers=auth("team-a"))
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "rate_limited" and "team-a" in refused.json()["error"]["message"]
        assert int(refused.headers["retry-after"]) >= 1
        other = client.post("/v1/generate", json={"prompt": "a", "seed": 1}, headers=auth("team-b"))
        assert other.status_code == 200  # another key is served meanwhile
    assert sample(metrics(keyed), "janus_rate_limited_total", key="team-a") >= 1
    log = keyed.log()
    assert '"key": "team-a"' in log and KEYS["team-a"] not in log  # the name, never the key


def test_images_per_minute(keyed):
    ok = httpx.post(keyed.url + "/v1/generate", json={"prompt": "a", "n": 2}, headers=auth("team-c"), timeout=120)
    assert ok.status_code == 200
    refused = httpx.post(keyed.url + "/v1/generate", json={"prompt": "a"}, headers=auth("team-c"), timeout=120)
    assert refused.status_code == 429 and "images per minute" in refused.json()["error"]["message"]
    assert 1 <= int(refused.headers["retry-after"]) <= 30


def test_a_changed_keys_file_applies_without_a_restart(keyed):
    new = f"  - {{name: late, sha256: {sha('secret-late')}}}\n"
    keyed.keys_path.write_text(keys_yaml(new))
    deadline = time.monotonic() + 30
    while True:  # the server looks at the file at most once a second
        r = httpx.get(keyed.url + "/v1/models", headers={"Authorization": "Bearer secret-late"})
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert r.status_code == 200
    keyed.keys_path.write_text("keys: [ {broken\n")  # a broken file keeps the keys already loaded
    time.sleep(1.5)
    assert httpx.get(keyed.url + "/v1/models", headers={"Authorization": "Bearer secret-late"}).status_code == 200
    keyed.keys_path.write_text(keys_yaml())


# --- bounded labels ---------------------------------------------------------------------------------------


def test_made_up_paths_share_one_label(keyed):
    with httpx.Client(base_url=keyed.url, headers=auth("ops")) as client:
        for _ in range(300):
            assert client.get(f"/v1/{uuid.uuid4().hex}").status_code == 404
    text = metrics(keyed)
    endpoints = {s.labels["endpoint"] for f in text_string_to_metric_families(text) for s in f.samples
                 if s.name == "janus_requests_total"}
    routes = set(httpx.get(keyed.url + "/openapi.json", headers=auth("ops")).json()["paths"])
    assert "unmatched" in endpoints and endpoints <= routes | {"unmatched"}, endpoints


# --- images -------------------------------------------------------------------------------------------------


def sixteen_bit_png(side: int) -> bytes:
    values = np.zeros((side, side), dtype=np.uint16)
    values[::7, ::5] = 40000
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


@pytest.fixture(scope="module")
def lone_api(redis_server, tmp_path_factory):
    """An api process with no worker behind it: what it spends on a request is the edge's own cost."""
    logs = tmp_path_factory.mktemp("lone-api")
    proc = start_server(["api", "--queue", redis_server.url], logs, {"JANUS_REQUEST_TIMEOUT": "3"}, wait_ready=False)
    wait_http_ok(proc.url + "/health", proc.proc, proc.log_path)
    yield proc
    proc.stop()


def test_large_16_bit_images_cost_the_api_bounded_memory(lone_api):
    """Three concurrent requests, each with a ~90 KiB PNG of 6300x6300 16-bit pixels, to an api process: it reads
    headers, then decodes under a pixel budget in the file's own mode (2 bytes a pixel). Before, each decode went
    through float64 copies: about 760 MiB apiece, 2.3 GiB for the three."""
    data = b64(sixteen_bit_png(6300))
    before = status_of(lone_api.proc.pid)
    body = {"prompt": "what is it", "images": [data], "max_new_tokens": 1}
    with cf.ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(lambda _: httpx.post(lone_api.url + "/v1/understand", json=body, timeout=60),
                                range(3)))
    assert [r.status_code for r in replies] == [504] * 3, replies[0].text  # admitted; no worker to run them
    grown_mib = (status_of(lone_api.proc.pid)["VmHWM"] - before["VmRSS"]) / 1024
    assert grown_mib < 200, grown_mib


def test_redis_refuses_new_jobs_before_its_maxmemory(lone_api, redis_server):
    client = redis.Redis.from_url(redis_server.url)
    used = int(client.info("memory")["used_memory"])
    client.config_set("maxmemory", used + 64 * 1024)  # already past the admission share of it
    try:
        time.sleep(1.1)  # the api reads Redis' memory figures at most once a second
        r = httpx.post(lone_api.url + "/v1/generate", json={"prompt": "a"}, timeout=30)
    finally:
        client.config_set("maxmemory", 0)
        time.sleep(1.1)  # the api's copy of the figures expires: later tests of this module find it admitting
    assert r.status_code == 503 and "maxmemory" in r.json()["error"]["message"] and r.headers["retry-after"]


def chunky_png(chunks: int) -> bytes:
    """A valid 1x1 PNG with `chunks` empty ancillary chunks ahead of its pixels: tiny work per byte for a
    client, but a parser walks every chunk before it reaches the size it reports."""
    png = png_bytes((1, 1))
    ihdr_end = 8 + 25
    filler = b"\x00\x00\x00\x00zzZz" + zlib.crc32(b"zzZz").to_bytes(4, "big")  # a private, safe-to-copy chunk
    return png[:ihdr_end] + filler * chunks + png[ihdr_end:]


def test_a_slow_to_parse_image_leaves_the_event_loop_free(lone_api):
    """Image headers are read on the image threads, not the event loop the probes and every other client use."""
    body = {"prompt": "what is it", "images": [b64(chunky_png(1_000_000))], "max_new_tokens": 1}
    with cf.ThreadPoolExecutor(3) as pool:
        posts = [pool.submit(httpx.post, lone_api.url + "/v1/understand", json=body, timeout=120) for _ in range(2)]
        time.sleep(0.5)  # both are being parsed
        slowest = 0.0
        while not all(p.done() for p in posts):
            started = time.monotonic()
            assert httpx.get(lone_api.url + "/health", timeout=30).status_code == 200
            slowest = max(slowest, time.monotonic() - started)
            time.sleep(0.05)
    assert all(p.result().status_code in (400, 504) for p in posts), [p.result().text for p in posts]
    assert slowest < 0.5, slowest


@pytest.mark.parametrize("fmt", ["TGA", "TIFF", "PPM", "ICO"])
def test_formats_outside_the_allowlist_are_refused(keyed, fmt):
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(buf, format=fmt)
    r = httpx.post(keyed.url + "/v1/understand", json={"prompt": "q", "images": [b64(buf.getvalue())]},
                   headers=auth("team-b"), timeout=60)
    assert r.status_code == 400 and "accepted: PNG, JPEG, WEBP, GIF, BMP" in r.json()["error"]["message"]


# --- remote images ----------------------------------------------------------------------------------------------


def chat_with_image(server, url: str) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": "what is it"}]}],
            "max_tokens": 1}
    return httpx.post(server.url + "/v1/chat/completions", json=body, headers=auth("team-b"), timeout=60)


def test_remote_images_listed_address_deadline_and_private_names(keyed, image_host):
    port = image_host.server_address[1]
    assert chat_with_image(keyed, f"http://127.0.0.2:{port}/ok.png").status_code == 200
    # a listed name that resolves inside the network is refused unless the address itself is listed
    private = chat_with_image(keyed, f"http://localhost:{port}/ok.png")
    assert private.status_code == 400 and "internal address" in private.json()["error"]["message"]
    zipped = chat_with_image(keyed, f"http://127.0.0.2:{port}/gzip.png")  # could inflate to anything
    assert zipped.status_code == 400 and "gzip-encoded" in zipped.json()["error"]["message"]
    started = time.monotonic()
    slow = chat_with_image(keyed, f"http://127.0.0.2:{port}/slow.png")
    assert slow.status_code == 400 and "within 1 s" in slow.json()["error"]["message"]
    assert time.monotonic() - started < 10


# --- malformed input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/understand", "/v1/generate", "/v1/chat/completions", "/v1/completions",
                                  "/v1/images/generations"])
def test_deeply_nested_json_is_a_4xx(keyed, path):
    body = "[" * 100_000 + "]" * 100_000
    r = httpx.post(keyed.url + path, content=body, headers={**auth("team-b"), "Content-Type": "application/json"},
                   timeout=60)
    assert 400 <= r.status_code < 500, r.text


@pytest.mark.parametrize("url", ["http://exam\uff0fple.com/a.png", "http://a\uff20b.com/x.png",
                                 "http://[::1/x.png", "http://host:99999/x.png"])
def test_malformed_image_urls_are_a_400(keyed, url):
    r = chat_with_image(keyed, url)
    assert r.status_code == 400, r.text


def test_too_many_messages_is_a_4xx(keyed):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}] * 200
    r = httpx.post(keyed.url + "/v1/chat/completions", json={"messages": messages}, headers=auth("team-b"))
    assert r.status_code == 400 and "256" in r.text


# --- start-up ---------------------------------------------------------------------------------------------------


def test_require_api_key_refuses_to_start_without_one(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JANUS_")}
    done = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--model", str(tmp_path), "--require-api-key"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no API key is set" in done.stderr
    bad = tmp_path / "keys.json"
    bad.write_text(json.dumps([{"name": "a", "key": "plain"}]))
    done = subprocess.run([sys.executable, "-m", "server.cli", "api", "--queue", "redis://127.0.0.1:1/0",
                           "--api-keys-file", str(bad)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unknown field" in done.stderr


def test_serving_beyond_loopback_without_a_key_warns(caplog):
    from server.cli import build_parser, check_keys, settings_from

    args = build_parser().parse_args(["serve", "--model", "m", "--host", "0.0.0.0"])
    with caplog.at_level("WARNING"):
        assert check_keys(settings_from(args), args) is None
    assert "with no API key" in caplog.text
    args = build_parser().parse_args(["serve", "--model", "m", "--api-key", "k"])
    caplog.clear()
    with caplog.at_level("WARNING"):
        check_keys(settings_from(args), args)
    assert "command line" in caplog.text and "with no API key" not in caplog.text




# --- connections and the in-process queue's memory --------------------------------------------------------------


@pytest.fixture(scope="module")
def narrow(tiny_hf_dir, tmp_path_factory):
    env = {"JANUS_MAX_CONNECTIONS": "8", "JANUS_MAX_STORED_RESULT_BYTES": "1000000"}
    proc = start_server(["serve", "--model", str(tiny_hf_dir)], tmp_path_factory.mktemp("narrow"), env)
    yield proc
    proc.stop()


def test_idle_connections_beyond_the_limit_are_turned_away(narrow):
    sockets = [socket.create_connection(("127.0.0.1", narrow.port)) for _ in range(8)]
    try:
        assert httpx.get(narrow.url + "/health").status_code == 503
    finally:
        for sock in sockets:
            sock.close()
    deadline = time.monotonic() + 10
    while httpx.get(narrow.url + "/health").status_code != 200:  # the server notices the closes
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_finished_jobs_keep_no_images_and_bounded_results(narrow):
    """Forty understanding requests, each with a ~3 MiB image and one new token: the in-process queue drops each
    job's images when it finishes and keeps at most 1 MB of results, so memory does not grow with them (before:
    every request's images stayed for 600 s)."""
    noise = np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="PNG", compress_level=0)
    body = {"prompt": "what is it", "images": [b64(buf.getvalue())], "max_new_tokens": 1}
    with httpx.Client(base_url=narrow.url, timeout=120) as client:
        for _ in range(5):  # warm-up: the allocator's pools and the first decode
            assert client.post("/v1/understand", json=body).status_code == 200
        before = status_of(narrow.proc.pid)["VmRSS"]
        for _ in range(40):
            assert client.post("/v1/understand", json=body).status_code == 200
    grown_mib = (status_of(narrow.proc.pid)["VmRSS"] - before) / 1024
    assert grown_mib < 60, grown_mib  # 40 x 3 MiB of images alone would be 120 MiB


# --- quotas across frontends (Redis) ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_apis(redis_server, tiny_hf_dir, tmp_path_factory):
    """Two api processes in front of one worker, over one Redis: a key's quota is the same on both."""
    logs = tmp_path_factory.mktemp("two-apis")
    path = logs / "keys.yaml"
    path.write_text(f"""keys:
  - {{name: team-a, sha256: {sha(KEYS["team-a"])}, max_in_flight: 1}}
  - {{name: team-b, sha256: {sha(KEYS["team-b"])}, requests_per_minute: 2}}
  - {{name: team-c, sha256: {sha(KEYS["team-c"])}, images_per_minute: 2}}
""")
    worker = spawn_worker(redis_server.url, tiny_hf_dir, logs)
    env = {"JANUS_API_KEYS_FILE": str(path)}
    apis = [start_server(["api", "--queue", redis_server.url], logs, env, wait_ready=False) for _ in range(2)]
    try:
        for api in apis:
            wait_until_ready(api, 120)
        yield apis
    finally:
        for proc in (*apis, worker):
            proc.stop()


def test_quotas_hold_across_frontends(two_apis):
    first, second = two_apis
    with httpx.Client(timeout=120) as client, \
            client.stream("POST", first.url + "/v1/understand", json=SLOW, headers=auth("team-a")) as held:
        lines = held.iter_lines()
        next(lines)  # running on the first api
        refused = client.post(second.url + "/v1/understand", json=SLOW, headers=auth("team-a"))
        assert refused.status_code == 429 and "in flight" in refused.json()["error"]["message"]
    assert httpx.post(second.url + "/v1/generate", json={"prompt": "a"}, headers=auth("team-a"),
                      timeout=120).status_code == 200  # the slot came back when the stream ended
    quick = {"prompt": "a", "images": [IMAGE], "max_new_tokens": 1}
    for api in two_apis:
        reply = httpx.post(api.url + "/v1/understand", json=quick, headers=auth("team-b"), timeout=120)
        assert reply.status_code == 200
    third = httpx.post(first.url + "/v1/understand", json=quick, headers=auth("team-b"), timeout=120)
    assert third.status_code == 429 and "2 requests per minute" in third.json()["error"]["message"]
    assert 20 <= int(third.headers["retry-after"]) <= 30
    assert httpx.post(first.url + "/v1/generate", json={"prompt": "a", "n": 2}, headers=auth("team-c"),
                      timeout=120).status_code == 200
    images = httpx.post(second.url + "/v1/generate", json={"prompt": "a"}, headers=auth("team-c"), timeout=120)
    assert images.status_code == 429 and "images per minute" in images.json()["error"]["message"]
