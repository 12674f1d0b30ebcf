"""The batch files: OpenAI batch input lines, parsed into a `Request` to send or a `BadLine` to record; the output
file, appended to one whole line at a time and read back on resume (which lines are still to do); the response and
error records written to it; the images stored beside it. It knows nothing of HTTP, retries or the run.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

ROUTES = frozenset({"/v1/images/generations", "/v1/chat/completions", "/v1/generate", "/v1/understand"})


# --- input lines ----------------------------------------------------------------------------------------


def record_id(line_no: int, text: str) -> str:
    """The output line's `id`: the same for the same input line on every run, so a resume can recognise
    lines that have no usable custom_id."""
    return "batch_req_" + hashlib.sha256(f"{line_no}\n{text}".encode("utf-8", "surrogatepass")).hexdigest()[:32]


@dataclass(frozen=True)
class Request:
    """An input line to send: `body` is POSTed to `url` as JSON."""

    line_no: int
    record_id: str
    custom_id: str
    url: str
    body: dict[str, Any]

    def idempotency_key(self, scope: str) -> str:
        """Stable for this line within `scope` (the output file): a resend after a dropped connection, even from a
        resumed run, joins the first job; the same line written to another file runs afresh."""
        text = json.dumps([scope, self.custom_id, self.url, self.body], sort_keys=True)
        return "batch-" + hashlib.sha256(text.encode()).hexdigest()[:48]


@dataclass(frozen=True)
class BadLine:
    """An input line that cannot be sent; `custom_id` is None when it has none."""

    line_no: int
    record_id: str
    custom_id: str | None
    code: str
    message: str


def parse_line(line_no: int, text: str, seen: set[str]) -> Request | BadLine:
    """One input line; a custom_id it claims joins `seen` (the first line to claim an id owns it)."""

    def bad(code: str, message: str, custom_id: str | None = None) -> BadLine:
        return BadLine(line_no, record_id(line_no, text), custom_id, code, f"line {line_no}: {message}")

    if text.startswith(TOO_LONG):
        return bad("line_too_long", f"longer than {MAX_LINE_BYTES} bytes")
    try:  # NaN and Infinity are not JSON (Python's reader takes them; no server could be sent them)
        line = json.loads(text, parse_constant=_not_json)
    except (ValueError, RecursionError) as exc:
        return bad("invalid_json", f"not JSON ({exc})")
    if not isinstance(line, dict):
        return bad("invalid_json", f"a JSON object was expected, got {type(line).__name__}")
    try:  # bytes that are not UTF-8, or a lone surrogate's escape: nothing could send them
        json.dumps(line, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return bad("invalid_json", "not valid UTF-8 text")
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return bad("missing_custom_id", "custom_id must be a non-empty string")
    if len(custom_id) > MAX_CUSTOM_ID:
        return bad("invalid_custom_id", f"custom_id is {len(custom_id)} characters; at most {MAX_CUSTOM_ID}")
    if custom_id in seen:
        return bad("duplicate_custom_id", f"custom_id {custom_id!r} is used by an earlier line", custom_id)
    seen.add(custom_id)
    if line.get("method", "POST") != "POST":
        return bad("invalid_method", f"method must be POST, got {line.get('method')!r}", custom_id)
    url = line.get("url")
    if not isinstance(url, str) or url not in ROUTES:
        return bad("invalid_url", f"url must be one of {', '.join(sorted(ROUTES))}; got {url!r}", custom_id)
    body = line.get("body")
    if not isinstance(body, dict):
        return bad("missing_body", "body must be a JSON object", custom_id)
    if body.get("stream"):
        return bad("invalid_body", "stream is not supported in a batch", custom_id)
    return Request(line_no, record_id(line_no, text), custom_id, url, body)


MAX_LINE_BYTES = 64 * 2**20  # an input line (a request with images as base64) or an output line read back
MAX_CUSTOM_ID = 512
TOO_LONG = "\x00too long"  # what `bounded_lines` gives for a line over the limit (no JSON starts so)


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def bounded_lines(f: BinaryIO, limit: int = MAX_LINE_BYTES) -> Iterator[bytes]:
    """The lines of a binary file, each read with at most `limit` bytes held: a longer one is skipped to its end
    in chunks and given as `TOO_LONG`."""
    while True:
        line = f.readline(limit + 1)
        if not line:
            return
        if len(line) > limit and not line.endswith(b"\n"):
            while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                pass
            line = TOO_LONG.encode()
        yield line


def input_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of each non-blank line (a UTF-8 byte order mark at the start is no text)."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(bounded_lines(f), 1):
            text = raw.decode("utf-8", errors="surrogateescape")
            if line_no == 1:
                text = text.removeprefix("\ufeff")
            if text.strip():
                yield line_no, text.rstrip("\r\n")


# --- the output file, and resuming ------------------------------------------------------------------------


@dataclass
class Done:
    """What an earlier run wrote: the custom ids it answered, and the ids of all its lines."""

    answered: set[str]
    records: set[str]

    def has(self, item: Request | BadLine) -> bool:
        return item.record_id in self.records or (isinstance(item, Request) and item.custom_id in self.answered)


def recover(path: Path) -> Done:
    """Reads an earlier run's output, first cutting off a partial last line (a hard kill mid-write)."""
    done = Done(set(), set())
    if not path.exists():
        return done
    with open(path, "r+b") as f:
        cut_partial_line(f)
        f.seek(0)
        for raw in bounded_lines(f):
            try:
                line = json.loads(raw)
                done.records.add(line["id"])
                if line.get("response") is not None:
                    done.answered.add(line["custom_id"])
            except (ValueError, KeyError, TypeError, RecursionError):  # not a line of ours: left as it is
                continue
    return done


def cut_partial_line(f: BinaryIO, chunk: int = 1 << 16) -> None:
    """Truncates `f` after its last newline, reading backwards (outputs with images run to gigabytes)."""
    end = pos = f.seek(0, os.SEEK_END)
    cut = 0
    while pos > 0:
        start = max(pos - chunk, 0)
        f.seek(start)
        newline = f.read(pos - start).rfind(b"\n")
        if newline >= 0:
            cut = start + newline + 1
            break
        pos = start
    if cut < end:
        f.truncate(cut)


def pending(path: Path, done: Done) -> tuple[int, int, Iterator[Request | BadLine]]:
    """(lines in the file, lines already done, the lines still to do, read as they are taken)."""
    total = already = 0
    seen: set[str] = set()
    for line_no, text in input_lines(path):
        total += 1
        if done.records:  # only a resume needs each line parsed twice
            already += done.has(parse_line(line_no, text, seen))

    def todo() -> Iterator[Request | BadLine]:
        claimed: set[str] = set()
        for line_no, text in input_lines(path):
            item = parse_line(line_no, text, claimed)
            if not done.has(item):
                yield item

    return total, already, todo()


class OutputFile:
    """Appends whole lines: one unbuffered write per line, so readers (and a resume) never see half of one
    unless the process dies inside that write."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "ab", buffering=0)  # noqa: SIM115 - closed by close()
        self._broken: OSError | None = None

    def write(self, record: dict[str, Any]) -> None:
        """A write that fails (a full disk) is taken back to the line's start, and no line is written after it: the
        file stays whole lines, and a resume sends the rest."""
        if self._broken is not None:
            raise self._broken
        data = memoryview((json.dumps(record) + "\n").encode())
        start = self._file.seek(0, os.SEEK_END)
        try:
            while data:  # a raw write may take fewer bytes than given
                data = data[self._file.write(data):]
        except OSError as exc:
            self._broken = exc
            with contextlib.suppress(OSError):
                self._file.truncate(start)
            raise

    def close(self) -> None:
        self._file.close()


def response_record(request: Request, status: int, request_id: str, body: Any) -> dict[str, Any]:
    return {"id": request.record_id, "custom_id": request.custom_id,
            "response": {"status_code": status, "request_id": request_id, "body": body}, "error": None}


def error_record(line: BadLine) -> dict[str, Any]:
    return {"id": line.record_id, "custom_id": line.custom_id, "response": None,
            "error": {"code": line.code, "message": line.message}}


# --- images ---------------------------------------------------------------------------------------------

EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}


def image_name(custom_id: str, index: int, ext: str) -> str:
    """A file name safe whatever the custom_id: its ASCII letters, digits, `_` and `-` (no dots, no separators,
    no leading `-` that a shell would read as an option), its last 48 of them (ids often share a long prefix), and
    16 hex digits of its hash so that two ids do not share a file."""
    safe = re.sub(r"[^A-Za-z0-9_-]+", "_", custom_id).strip("_-")[-48:].lstrip("_-") or "image"
    digest = hashlib.sha256(custom_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{safe}-{digest}-{index}.{ext}"


def image_entries(url: str, body: Any) -> list[tuple[dict[str, Any], str, str]]:
    """(entry, base64 key, file extension) of each image in an answer: `data[i].b64_json` of the OpenAI route,
    `images[i].b64_<format>` of the native one."""
    if not isinstance(body, dict):
        return []
    if url == "/v1/images/generations":
        ext = EXTENSIONS.get(str(body.get("output_format", "png")), "png")
        return [(e, "b64_json", ext) for e in body.get("data") or [] if isinstance(e, dict) and "b64_json" in e]
    if url == "/v1/generate":
        return [(e, f"b64_{fmt}", ext) for e in body.get("images") or [] for fmt, ext in EXTENSIONS.items()
                if isinstance(e, dict) and f"b64_{fmt}" in e]
    return []


def store_images(request: Request, body: Any, images_dir: Path | None) -> int:
    """Counts the images of an answer; with `images_dir`, writes each to a file there and puts `path` in place of
    its base64 in `body`. Files are complete (written, then renamed) before the line that names them."""
    entries = image_entries(request.url, body)
    if images_dir is None:
        return len(entries)
    for i, (entry, key, ext) in enumerate(entries):
        path = images_dir / image_name(request.custom_id, i, ext)
        partial = path.with_name(path.name + ".partial")
        partial.write_bytes(base64.b64decode(entry[key]))
        os.replace(partial, path)
        del entry[key]
        entry["path"] = str(path)
    return len(entries)
