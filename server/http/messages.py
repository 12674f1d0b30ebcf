"""OpenAI-shaped conversations -> job messages + image bytes, for /v1/chat/completions and /v1/understand.

Each message becomes `{"role", "text", "images"}` (the image count; the bytes go in one flat list in
conversation order), the shape `UnderstandParams.messages` carries through the queue. `developer`
is OpenAI's newer name for `system`. Several text parts of one message are joined with a newline
(as vLLM does); a message's images go ahead of its text (Janus' own convention). Images come as
`data:` URLs; a remote http(s) URL is fetched only when its host is in `allowed_image_hosts`.
Conversation rules (order of roles, where images may be) are janus_core's, checked in `Service`.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any
from urllib.parse import urlparse

import httpx

from server import netcheck
from server.http.common import decode_image_payload
from server.http.schemas import ChatMessage, ImagePart
from server.service import BadRequest
from server.settings import Settings


async def read_messages(messages: list[ChatMessage], settings: Settings) -> tuple[list[dict[str, Any]], list[bytes]]:
    """Job messages and every image of the conversation in order (fetched or decoded from base64)."""
    count = sum(1 for m in messages if isinstance(m.content, list)
                for part in m.content if isinstance(part, ImagePart))
    if count > settings.max_images:
        raise BadRequest(f"the conversation has {count} images; at most {settings.max_images} are allowed "
                         "in one conversation")
    out: list[dict[str, Any]] = []
    images: list[bytes] = []
    for i, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        if not isinstance(message.content, list):  # a string, or an assistant turn without content
            out.append({"role": role, "text": message.content or "", "images": 0})
            continue
        texts: list[str] = []
        found = 0
        for j, part in enumerate(message.content):
            if isinstance(part, ImagePart):
                label = f"messages[{i}].content[{j}].image_url"
                images.append(await fetch_image(part.image_url.url, label, settings))
                found += 1
            else:
                texts.append(part.text)
        out.append({"role": role, "text": "\n".join(texts), "images": found})
    return out, images


async def fetch_image(url: str, label: str, settings: Settings) -> bytes:
    if url.startswith("data:"):
        return decode_image_payload(url, 0, settings.max_image_bytes, label=label)
    try:
        parsed = urlparse(url)
        parsed.port  # noqa: B018 - a malformed port raises here, not later
    except ValueError as exc:  # e.g. full-width characters in the host that NFKC turns into '/' or '@'
        raise BadRequest(f"{label} is not a valid URL ({exc})") from exc
    if parsed.scheme not in ("http", "https"):
        raise BadRequest(f"{label} must be a data: URL (or an allowed http(s) URL)")
    host = parsed.hostname or ""
    if not netcheck.is_listed(host, settings.allowed_image_hosts):
        raise BadRequest(f"{label}: remote image URLs are refused (host {host!r} is not "
                         "in JANUS_ALLOWED_IMAGE_HOSTS); send a data: URL")
    port = parsed.port or netcheck.DEFAULT_PORTS[parsed.scheme]
    try:
        async with asyncio.timeout(settings.image_fetch_timeout), _fetch_slots():
            try:
                address = await netcheck.resolve_checked(host, port, settings.allowed_image_hosts,
                                                         "JANUS_ALLOWED_IMAGE_HOSTS")
            except netcheck.AddressRefused as exc:
                raise BadRequest(f"{label}: {exc}") from exc
            # connect to the address just checked, naming the host in the Host header and in TLS
            return await _download(netcheck.pin(parsed, address), label, settings.max_image_bytes)
    except TimeoutError as exc:
        raise BadRequest(f"{label} could not be fetched within {settings.image_fetch_timeout:g} s") from exc


MAX_FETCHES = 8  # remote images fetched at once by this process; more wait their turn (within the deadline)
_slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = weakref.WeakKeyDictionary()


def _fetch_slots() -> asyncio.Semaphore:
    loop = asyncio.get_running_loop()
    if loop not in _slots:
        _slots[loop] = asyncio.Semaphore(MAX_FETCHES)
    return _slots[loop]


async def _download(target: netcheck.Pinned, label: str, max_bytes: int) -> bytes:
    headers = {**target.headers, "Accept-Encoding": "identity"}
    try:
        async with httpx.AsyncClient(timeout=10.0, follow_redirects=False, trust_env=False) as client, \
                client.stream("GET", target.url, headers=headers, extensions=target.extensions) as response:
            if response.status_code != 200:
                raise BadRequest(f"{label}: fetching it returned HTTP {response.status_code}")
            encoding = response.headers.get("content-encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):  # a small compressed body can inflate to any size
                raise BadRequest(f"{label}: the server sent it {encoding}-encoded; only plain bodies are taken")
            data = bytearray()
            async for chunk in response.aiter_raw():
                data += chunk
                if len(data) > max_bytes:
                    raise BadRequest(f"{label} is larger than {max_bytes} bytes", 413)
            return bytes(data)
    except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:
        raise BadRequest(f"{label} could not be fetched: {exc}") from exc
