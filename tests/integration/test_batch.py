"""`janus-server batch`: OpenAI batch files through a real `janus-server serve` (--url) and through the app loaded
in-process (--model), interrupted with Ctrl+C and resumed; and its parts without a model (bad lines, resume,
image file names, Retry-After).

Every output line is checked against OpenAI's batch output shape (`BatchOutputLine` below: the installed `openai`
package has no type for batch output lines, only for the Batch object).
"""

from __future__ import annotations

import base64
import email.utils
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

from server import cli
from server.batch.command import DONE, INTERRUPTED, USAGE
from server.batch.files import (
    TOO_LONG,
    BadLine,
    Done,
    OutputFile,
    Request,
    bounded_lines,
    cut_partial_line,
    error_record,
    image_name,
    input_lines,
    parse_line,
    pending,
    recover,
    response_record,
    store_images,
)
from server.batch.send import retry_after
from tests.support.images import b64, png_bytes
from tests.support.servers import ServerProcess, metric, start_server, wait_for_fresh_metrics

pytestmark = pytest.mark.timeout(240)

KEY = "batch-test-key"


# --- OpenAI's batch output line ---------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class BatchResponse(_Strict):
    status_code: int
    request_id: str
    body: dict[str, Any]


class BatchError(_Strict):
    code: str
    message: str


class BatchOutputLine(_Strict):
    """One line of an OpenAI batch output file (the API reference's "The request output object")."""

    id: str = Field(pattern=r"^batch_req_[0-9a-f]+$")
    custom_id: str | None
    response: BatchResponse | None
    error: BatchError | None

    @model_validator(mode="after")
    def _one_of(self) -> BatchOutputLine:
        assert (self.response is None) != (self.error is None), "a line has a response or an error, not both"
        return self


# --- helpers ----------------------------------------------------------------------------------------------------


def _line(custom_id: str, url: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def _write_input(path: Path, lines: list[dict[str, Any] | str]) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def _requests(count: int, image_b64: str) -> list[dict[str, Any]]:
    """`count` lines of the four routes in turn, small: n of 1 or 2, 4 new tokens; seeded or greedy."""
    picture = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image_b64}}
    lines = []
    for i in range(count):
        kind = i % 4
        if kind == 0:
            body = {"prompt": f"a red fox #{i}", "n": 1 + i % 8 // 4, "seed": i}
            lines.append(_line(f"images-{i}", "/v1/images/generations", body))
        elif kind == 1:
            lines.append(_line(f"generate-{i}", "/v1/generate", {"prompt": f"a blue boat #{i}", "seed": i}))
        elif kind == 2:
            messages = [{"role": "user", "content": [{"type": "text", "text": f"What is this? #{i}"}, picture]}]
            body = {"messages": messages, "max_tokens": 4, "temperature": 0}
            lines.append(_line(f"chat-{i}", "/v1/chat/completions", body))
        else:
            body = {"prompt": f"Describe #{i}", "images": [image_b64], "max_new_tokens": 4, "temperature": 0}
            lines.append(_line(f"understand-{i}", "/v1/understand", body))
    return lines


def _command(source: Path, output: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "server.cli", "batch", str(source), "--output", str(output), *args]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JANUS_")}
    return {**env, "HF_HUB_OFFLINE": "1", **extra}


def _start(cmd: list[str], stderr: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with open(stderr, "wb") as err:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)


def _run(cmd: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False)


def _poll(what: str, ready, proc: subprocess.Popen[bytes], stderr: Path, timeout: float = 90) -> None:
    """Polls until `ready()` (a file the batch writes); the batch must still be running."""
    give_up = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"batch exited with {proc.returncode} before {what}:\n{stderr.read_text()[-3000:]}"
        assert time.monotonic() < give_up, f"no {what} after {timeout}s:\n{stderr.read_text()[-3000:]}"
        time.sleep(0.02)


def _lines_in(path: Path, count: int):
    return lambda: path.exists() and path.read_bytes().count(b"\n") >= count


def _read_output(path: Path) -> list[dict[str, Any]]:
    """Every line whole (the file ends with a newline), JSON, and of OpenAI's batch output shape."""
    data = path.read_bytes()
    assert data.endswith(b"\n"), f"a partial last line: {data[-200:]!r}"
    lines = [json.loads(raw) for raw in data.decode().splitlines()]
    for line in lines:
        BatchOutputLine.model_validate(line)
    return lines


def _by_id(lines: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    counts = Counter(line["custom_id"] for line in lines)
    assert max(counts.values()) == 1, [k for k, n in counts.items() if n > 1]
    return {line["custom_id"]: line for line in lines}


def _image_files(line: dict[str, Any]) -> list[Path]:
    body = line["response"]["body"]
    entries = body["data"] if "data" in body else body["images"]
    assert all(set(e) & {"b64_json", "b64_png"} == set() for e in entries), "base64 left beside the path"
    return [Path(e["path"]) for e in entries]


# --- against a real server: Ctrl+C, resume, images on disk ---------------------------------------------------


def test_batch_against_a_server_is_interrupted_and_resumed(server: ServerProcess, image_b64: str, tmp_path: Path):
    lines: list[dict[str, Any] | str] = list(_requests(64, image_b64))
    lines.insert(20, _line("bad-route", "/v1/embeddings", {"input": "x"}))
    source, output, images = _write_input(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl", tmp_path / "images"
    cmd = _command(source, output, "--url", server.url, "--images-dir", str(images), "--concurrency", "4")

    # 1. Ctrl+C once some lines are written: the requests in flight finish, the file is whole, exit 130
    stderr = tmp_path / "first.err"
    proc = _start(cmd, stderr, _env())
    _poll("4 output lines", _lines_in(output, 4), proc, stderr)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == INTERRUPTED, stderr.read_text()[-3000:]
    first = output.read_bytes()
    interrupted = _read_output(output)
    assert 4 <= len(interrupted) < 65, len(interrupted)
    assert "stopping" in stderr.read_text()

    # 2. a hard kill's partial last line is cut off; the run goes on from where it stopped
    with open(output, "ab") as f:
        f.write(b'{"id": "batch_req_0", "custom_id": "images-0", "response": {"status_co')
    resumed = _run(cmd, _env())
    assert resumed.returncode == DONE, resumed.stderr[-3000:]
    assert f"(and {len(interrupted)} before)" in resumed.stderr
    assert output.read_bytes().startswith(first)  # appended to, never rewritten
    done = _by_id(_read_output(output))
    assert set(done) == {line["custom_id"] for line in lines if isinstance(line, dict)}  # 65: one line per id

    bad = done.pop("bad-route")
    assert bad["response"] is None and bad["error"]["code"] == "invalid_url"
    assert "/v1/embeddings" in bad["error"]["message"]
    assert {line["response"]["status_code"] for line in done.values()} == {200}
    assert all(line["response"]["request_id"] for line in done.values())
    for custom_id, line in done.items():
        if custom_id.startswith(("images-", "generate-")):
            files = _image_files(line)
            n = next(x["body"].get("n", 1) for x in lines if isinstance(x, dict) and x["custom_id"] == custom_id)
            assert len(files) == n and all(path.parent == images for path in files)
            for path in files:
                assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
                assert Image.open(path).size == (64, 64)
    made = [path for k, x in done.items() if k.startswith(("images-", "generate-")) for path in _image_files(x)]
    assert sorted(images.iterdir()) == sorted(made)  # and no partial files
    failed = 0 if any(x["custom_id"] == "bad-route" for x in interrupted) else 1  # the bad line, in whichever run
    assert f"failed {failed}, images " in resumed.stderr.splitlines()[-1]
    assert "images/s" in resumed.stderr.splitlines()[-1]


@pytest.fixture(scope="module")
def keyed_server(tiny_hf_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A server with an API key and a small queue: a key may hold 3/4 of it (3 requests) in flight."""
    proc = start_server(["serve", "--model", str(tiny_hf_dir), "--max-queue-depth", "4", "--open-metrics"],
                        tmp_path_factory.mktemp("batch-keyed"), {"JANUS_API_KEY": KEY})
    yield proc
    proc.stop()


def test_batch_sends_the_key_retries_refusals_and_never_runs_a_line_twice(keyed_server: ServerProcess,
                                                                           tmp_path: Path):
    """429s (over the key's in-flight share) are retried after Retry-After; abandoned requests (Ctrl+C twice) are
    sent again with the same Idempotency-Key on resume, and join the jobs already running: each image is made once."""
    url = keyed_server.url
    lines = [_line(f"boat-{i}", "/v1/generate", {"prompt": f"a boat #{i}", "seed": i}) for i in range(12)]
    source = _write_input(tmp_path / "in.jsonl", lines)

    # without the key every answer is a 401, recorded as the response it is
    unkeyed = _run(_command(source, tmp_path / "unkeyed.jsonl", "--url", url), _env())
    assert unkeyed.returncode == DONE, unkeyed.stderr[-3000:]
    assert {x["response"]["status_code"] for x in _read_output(tmp_path / "unkeyed.jsonl")} == {401}

    images_before = metric(url, "janus_images_generated_total")
    output, stderr = tmp_path / "out.jsonl", tmp_path / "first.err"
    cmd = _command(source, output, "--url", url, "--concurrency", "6")
    proc = _start(cmd, stderr, _env(JANUS_API_KEY=KEY))
    _poll("an output line", _lines_in(output, 1), proc, stderr)
    proc.send_signal(signal.SIGINT)
    _poll("the stop message", lambda: b"stopping" in stderr.read_bytes(), proc, stderr)
    proc.send_signal(signal.SIGINT)  # abandon the requests in flight
    assert proc.wait(60) == INTERRUPTED, stderr.read_text()[-3000:]
    assert len(_read_output(output)) < 12

    resumed = _run(cmd, _env(JANUS_API_KEY=KEY))
    assert resumed.returncode == DONE, resumed.stderr[-3000:]
    done = _by_id(_read_output(output))
    assert set(done) == {x["custom_id"] for x in lines}
    assert {x["response"]["status_code"] for x in done.values()} == {200}
    assert metric(url, "janus_rate_limited_total", key="default") > 0  # refusals happened, and were retried
    wait_for_fresh_metrics(url)
    assert metric(url, "janus_images_generated_total") - images_before == 12


# --- in-process: the same answers as the server -----------------------------------------------------------------


def test_batch_in_process_answers_as_the_server_does(server: ServerProcess, tiny_hf_dir: Path, image_b64: str,
                                                     tmp_path: Path):
    lines = _requests(8, image_b64)
    source, output = _write_input(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    result = _run(_command(source, output, "--model", str(tiny_hf_dir), "--max-batch-size", "4"), _env(),
                  timeout=180)
    assert result.returncode == DONE, result.stderr[-3000:]
    done = _by_id(_read_output(output))
    assert set(done) == {x["custom_id"] for x in lines}
    for line in lines:
        ours = done[line["custom_id"]]["response"]
        served = httpx.post(server.url + line["url"], json=line["body"], timeout=60)
        assert (ours["status_code"], served.status_code) == (200, 200), (ours, served.text)
        assert _essence(line["url"], ours["body"]) == _essence(line["url"], served.json()), line["custom_id"]


def _essence(url: str, body: dict[str, Any]) -> Any:
    """What a seeded or greedy request must reproduce: the image bytes, the text."""
    if url == "/v1/images/generations":
        return [base64.b64decode(e["b64_json"]) for e in body["data"]]
    if url == "/v1/generate":
        return body["seed"], [base64.b64decode(e["b64_png"]) for e in body["images"]]
    if url == "/v1/chat/completions":
        return body["choices"][0]["message"]["content"], body["usage"]
    return body["text"], body["usage"]


@pytest.mark.parametrize(("args", "message"), [
    (["--url", "http://127.0.0.1:9", "--model", "m"], "not both"),
    ([], "give --url"),
    (["--url", "127.0.0.1:8000"], "must start with http://"),
])
def test_usage_errors_exit_2(args: list[str], message: str, tmp_path: Path, monkeypatch, capsys):
    monkeypatch.delenv("JANUS_MODEL", raising=False)
    source = _write_input(tmp_path / "in.jsonl", [])
    assert cli.main(["batch", str(source), "--output", str(tmp_path / "out.jsonl"), *args]) == USAGE
    assert message in capsys.readouterr().err
    assert cli.main(["batch", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "o.jsonl"),
                     "--url", "http://127.0.0.1:9"]) == USAGE
    assert "no such file" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


# --- parts, without a model -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "code"), [
    ("{not json", "invalid_json"),
    ('["a list"]', "invalid_json"),
    ('{"method": "POST", "url": "/v1/generate", "body": {}}', "missing_custom_id"),
    ('{"custom_id": 7, "url": "/v1/generate", "body": {}}', "missing_custom_id"),
    ('{"custom_id": "first", "url": "/v1/generate", "body": {}}', "duplicate_custom_id"),
    ('{"custom_id": "a", "method": "GET", "url": "/v1/generate", "body": {}}', "invalid_method"),
    ('{"custom_id": "a", "url": "/v1/embeddings", "body": {}}', "invalid_url"),
    ('{"custom_id": "a", "url": ["/v1/generate"], "body": {}}', "invalid_url"),
    ('{"custom_id": "a", "url": "/v1/generate", "body": {"prompt": "\\ud800"}}', "invalid_json"),
    ('{"custom_id": "a", "url": "/v1/generate", "body": {"prompt": "\udcff"}}', "invalid_json"),
    ('{"custom_id": "a", "url": "/v1/generate"}', "missing_body"),
    ('{"custom_id": "a", "url": "/v1/generate", "body": "prompt"}', "missing_body"),
    ('{"custom_id": "a", "url": "/v1/understand", "body": {"stream": true}}', "invalid_body"),
    ('{"custom_id": "a", "url": "/v1/generate", "body": {"prompt": "x", "temperature": NaN}}', "invalid_json"),
    ('{"custom_id": "a", "url": "/v1/generate", "body": {"prompt": "x", "cfg_weight": -Infinity}}', "invalid_json"),
    ('{"custom_id": "' + "x" * 513 + '", "url": "/v1/generate", "body": {}}', "invalid_custom_id"),
    ("\x00too long", "line_too_long"),
])
def test_lines_that_cannot_be_sent_name_their_problem(text: str, code: str):
    seen = {"first"}
    item = parse_line(9, text, seen)
    assert isinstance(item, BadLine) and item.code == code and item.message.startswith("line 9: ")
    record = error_record(item)
    BatchOutputLine.model_validate(record)
    assert record["response"] is None and record["error"]["code"] == code


def test_a_good_line_parses_and_claims_its_id():
    seen: set[str] = set()
    text = json.dumps(_line("x", "/v1/chat/completions", {"messages": []}))
    item = parse_line(1, text, seen)
    assert isinstance(item, Request) and (item.custom_id, item.url, item.body) == ("x", "/v1/chat/completions",
                                                                                   {"messages": []})
    assert seen == {"x"} and item.record_id == parse_line(1, text, set()).record_id
    no_method = parse_line(2, json.dumps({"custom_id": "y", "url": "/v1/generate", "body": {"prompt": "a"}}), seen)
    assert isinstance(no_method, Request)  # POST is what the method means when it is left out


def test_idempotency_keys_are_stable_per_line_and_output():
    line = parse_line(1, json.dumps(_line("x", "/v1/generate", {"prompt": "a", "seed": 1})), set())
    other = parse_line(1, json.dumps(_line("x", "/v1/generate", {"prompt": "a", "seed": 2})), set())
    assert isinstance(line, Request) and isinstance(other, Request)
    key = line.idempotency_key("/out.jsonl")
    assert key == line.idempotency_key("/out.jsonl") and key.isascii() and key.isprintable() and len(key) <= 255
    assert key != other.idempotency_key("/out.jsonl") and key != line.idempotency_key("/other.jsonl")


def test_resume_cuts_a_partial_line_and_skips_what_is_done(tmp_path: Path):
    lines = [_line("a", "/v1/generate", {"prompt": "a"}), _line("b", "/v1/generate", {"prompt": "b"}),
             _line("a", "/v1/generate", {"prompt": "again"}), "not json", _line("c", "/v1/generate", {"prompt": "c"})]
    source = _write_input(tmp_path / "in.jsonl", lines)
    texts = source.read_text().splitlines()
    a = parse_line(1, texts[0], set())
    duplicate, not_json = parse_line(3, texts[2], {"a", "b"}), parse_line(4, texts[3], set())
    c = parse_line(5, texts[4], set())
    assert isinstance(a, Request) and isinstance(c, Request)
    assert isinstance(duplicate, BadLine) and isinstance(not_json, BadLine)
    output = tmp_path / "out.jsonl"
    whole = [response_record(a, 200, "r1", {"ok": True}), error_record(duplicate), error_record(not_json)]
    partial = json.dumps(response_record(c, 200, "r2", {"ok": True}))[:40]
    output.write_text("".join(json.dumps(r) + "\n" for r in whole) + partial)

    done = recover(output)
    assert output.read_text() == "".join(json.dumps(r) + "\n" for r in whole)  # the partial line is gone
    assert done.answered == {"a"}  # c's line was cut off; a duplicate's error line answers nothing
    total, already, todo = pending(source, done)
    assert (total, already) == (5, 3)
    assert [(x.line_no, x.custom_id) for x in todo] == [(2, "b"), (5, "c")]

    with open(output, "ab") as f:  # a file whose only line is partial, cut back to nothing
        f.truncate(0)
        f.write(b'{"id": "batch_req_')
    assert recover(output) == Done(set(), set()) and output.read_bytes() == b""


def test_input_lines_are_read_with_bounded_memory(tmp_path: Path):
    source = tmp_path / "in.jsonl"
    good = json.dumps(_line("a", "/v1/generate", {"prompt": "a"}))
    source.write_bytes(b"\xef\xbb\xbf" + good.encode() + b"\n" + b"{" + b"x" * 5000 + b"\n" + good.encode() + b"\n")
    with open(source, "rb") as f:
        assert [len(line) for line in bounded_lines(f, limit=1000)] == [len(good) + 4, len(TOO_LONG), len(good) + 1]
    lines = list(input_lines(source))
    assert lines[0] == (1, good)  # the byte order mark is no text
    assert [parse_line(n, text, set()).code for n, text in lines[1:2]] == ["invalid_json"]  # 5 kB is under 64 MiB


def test_a_failed_write_is_taken_back_and_nothing_follows_it(tmp_path: Path):
    path = tmp_path / "out.jsonl"
    output = OutputFile(path)
    output.write({"id": "1"})

    class Full:  # the disk fills in the middle of a line
        def __init__(self, real):
            self.real = real

        def write(self, data):
            self.real.write(bytes(data[:5]))
            raise OSError(28, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.real, name)

    output._file = Full(output._file)
    with pytest.raises(OSError):
        output.write({"id": "2"})
    with pytest.raises(OSError):
        output.write({"id": "3"})  # the file is broken: later lines are refused, not appended after a fragment
    output.close()
    assert path.read_text() == '{"id": "1"}\n'


def test_same_input_and_output_is_a_usage_error(tmp_path: Path, capsys):
    source = _write_input(tmp_path / "in.jsonl", [_line("a", "/nope", {})])
    assert cli.main(["batch", str(source), "--output", str(source), "--url", "http://127.0.0.1:9"]) == USAGE
    assert "is the input file" in capsys.readouterr().err
    assert cli.main(["batch", str(source), "--output", str(tmp_path), "--url", "http://127.0.0.1:9"]) == USAGE
    assert "is a folder" in capsys.readouterr().err


@pytest.mark.parametrize("chunk", [1, 3, 1 << 16])
def test_cutting_the_partial_line_across_read_chunks(tmp_path: Path, chunk: int):
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"a": 1}\n{"b": 2}\n{"c": 3, "d": "' + b"x" * 50)
    with open(path, "r+b") as f:
        cut_partial_line(f, chunk)
    assert path.read_bytes() == b'{"a": 1}\n{"b": 2}\n'


HOSTILE_IDS = ["../../etc/passwd", "/abs/path", "a/b", "a\\b", ".", "..", ".hidden", "", "x" * 5000, "a b", "a_b",
               "a?b", "a*b", "nul\x00byte", "CON", "é", "日本", "\ud800", "-rf", "line\nbreak"]


def test_image_names_are_safe_and_distinct_whatever_the_custom_id(tmp_path: Path):
    names = [image_name(custom_id, 0, "png") for custom_id in HOSTILE_IDS]
    assert len(set(names)) == len(names)
    for name in names:
        assert len(name) <= 80 and not name.startswith((".", "-")) and name.endswith("-0.png")
        assert all(c.isascii() and (c.isalnum() or c in "_-.") for c in name), name
        (tmp_path / name).write_bytes(b"x")
        assert (tmp_path / name).resolve().parent == tmp_path.resolve()
    assert image_name("a", 1, "png") != image_name("a", 0, "png")
    shared = "2024-06-01/experiment/some-long-dataset-name/with-a-long-prefix/prompt-"
    assert image_name(shared + "000001", 0, "png") != image_name(shared + "000002", 0, "png")
    assert "prompt-000001-" in image_name(shared + "000001", 0, "png")  # the id's end, where ids differ


def test_images_are_written_and_named_in_place_of_their_base64(tmp_path: Path):
    png, jpeg = png_bytes(), _jpeg()
    native = parse_line(1, json.dumps(_line("../n", "/v1/generate", {"prompt": "a", "n": 2})), set())
    openai = parse_line(2, json.dumps(_line("o", "/v1/images/generations", {"prompt": "a"})), set())
    assert isinstance(native, Request) and isinstance(openai, Request)
    native_body = {"id": "j", "seed": 1, "images": [{"b64_png": b64(png)}, {"b64_png": b64(png)}]}
    openai_body = {"data": [{"b64_json": b64(jpeg), "revised_prompt": None}], "output_format": "jpeg"}
    assert store_images(native, native_body, tmp_path) == 2
    assert store_images(openai, openai_body, tmp_path) == 1
    paths = [Path(e["path"]) for e in native_body["images"]] + [Path(openai_body["data"][0]["path"])]
    assert [p.read_bytes() for p in paths] == [png, png, jpeg]
    assert all(p.parent == tmp_path for p in paths) and paths[2].suffix == ".jpg"
    assert openai_body["data"][0] == {"revised_prompt": None, "path": str(paths[2])}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)  # no partial files left
    counted = {"images": [{"b64_png": "x"}]}
    assert store_images(native, counted, None) == 1 and counted == {"images": [{"b64_png": "x"}]}


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "blue").save(buf, format="JPEG")
    return buf.getvalue()


def test_retry_after_is_honoured_within_bounds():
    """Never sooner than Retry-After; backing off 1, 2, 4 s... where it asks for less; at most the bound."""
    assert retry_after("3", 1, 60) == 3.0
    assert retry_after("2.5", 3, 60) == 4.0
    assert retry_after("3600", 1, 60) == 60.0
    assert retry_after("-5", 1, 60) == 1.0
    in_ten = email.utils.formatdate(time.time() + 10, usegmt=True)
    assert 8 <= retry_after(in_ten, 1, 60) <= 10
    assert [retry_after(value, tries, 60) for value, tries in ((None, 1), ("soon", 2), ("", 3), ("nan", 4))] == [
        1.0, 2.0, 4.0, 8.0]
    assert retry_after(None, 20, 60) == 60.0
