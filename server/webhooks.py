"""Signed webhook deliveries for async jobs: the sender side.

A client that submits an async job with `"webhook": "https://..."` gets the job object POSTed there (JSON)
when the job ends. `check_webhook_url` vets the URL at submit time; the queue keeps the due deliveries
(`JobQueue.take_deliveries` / `delivery_done` / `delivery_retry`) and any frontend's `WebhookDeliverer` takes
them, `deliver`s each one (the address is checked again and pinned, as for remote images) and tells the queue
what is next: done, or again after the next of `settings.webhook_delays`.

Every delivery carries `Janus-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>` and
`Janus-Delivery-Id` (the same on every try of one job's delivery, for receivers to drop repeats: delivery is
at least once). This module knows the queue only through that contract and the job only as a dict.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import SplitResult, urlsplit, urlunsplit

import httpx

from server import netcheck
from server.logs import printable
from server.metrics import Metrics
from server.queue.base import Delivery, JobQueue
from server.service import BadRequest
from server.settings import Settings

log = logging.getLogger(__name__)

MAX_URL_CHARS = 2048
HOSTS_SETTING = "JANUS_ALLOWED_WEBHOOK_HOSTS"
USER_AGENT = "janus-server-webhooks"
SIGNATURE_HEADER = "Janus-Signature"
DELIVERY_ID_HEADER = "Janus-Delivery-Id"


# --- URLs ----------------------------------------------------------------------------------------------------


async def check_webhook_url(url: str, settings: Settings) -> str:
    """The normalised webhook URL, or `BadRequest` naming what is wrong: webhooks off, no secret, a malformed
    URL, one with credentials, plain http (accepted only to a listed IP address), an unlisted host, or a name
    that resolves to an internal address that is not itself listed."""
    parsed = _parse(url, settings)
    try:
        async with asyncio.timeout(settings.webhook_timeout):
            await netcheck.resolve_checked(parsed.hostname or "", _port(parsed), settings.allowed_webhook_hosts,
                                           HOSTS_SETTING)
    except netcheck.AddressRefused as exc:
        raise BadRequest(f"webhook: {exc}") from exc
    except TimeoutError as exc:
        raise BadRequest(f"webhook: resolving {parsed.hostname!r} took over "
                                 f"{settings.webhook_timeout:g} s") from exc
    host = parsed.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parsed.port is not None and parsed.port != netcheck.DEFAULT_PORTS[parsed.scheme]:
        netloc += f":{parsed.port}"
    return urlunsplit((parsed.scheme, netloc, parsed.path or "/", parsed.query, ""))


def _parse(url: str, settings: Settings) -> SplitResult:
    """The checks that need no lookup (made again before each delivery: settings may have changed)."""
    if not settings.allowed_webhook_hosts:
        raise BadRequest("webhooks are turned off on this server: set JANUS_ALLOWED_WEBHOOK_HOSTS to the "
                                 "hosts webhook URLs may name")
    if settings.webhook_secret is None or not settings.webhook_secret.get_secret_value():
        raise BadRequest("webhooks are turned off on this server: set JANUS_WEBHOOK_SECRET to sign deliveries")
    if len(url) > MAX_URL_CHARS:
        raise BadRequest(f"the webhook URL is longer than {MAX_URL_CHARS} characters")
    if not url.isascii() or any(c <= " " or c == "\x7f" for c in url):
        raise BadRequest("the webhook URL must be ASCII without spaces or control characters (punycode "
                                 "the host name, percent-encode the rest)")
    try:
        parsed = urlsplit(url)
        port = parsed.port
    except ValueError as exc:
        raise BadRequest(f"the webhook URL is not a valid URL ({exc})") from exc
    host = parsed.hostname or ""
    if parsed.scheme not in netcheck.DEFAULT_PORTS:
        raise BadRequest(f"the webhook URL must be an https:// URL (got scheme {parsed.scheme!r})")
    if not host:
        raise BadRequest("the webhook URL has no host")
    if port == 0:
        raise BadRequest("the webhook URL's port must be 1-65535")
    if "@" in parsed.netloc:
        raise BadRequest("the webhook URL must not carry credentials (user:password@); deliveries are signed")
    if not netcheck.is_listed(host, settings.allowed_webhook_hosts):
        raise BadRequest(f"webhook host {host!r} is not in {HOSTS_SETTING}")
    if parsed.scheme == "http" and netcheck.ip_literal(host) is None:
        raise BadRequest(f"the webhook URL must use https (plain http only to an IP address listed in "
                                 f"{HOSTS_SETTING})")
    return parsed


def _port(parsed: SplitResult) -> int:
    return parsed.port or netcheck.DEFAULT_PORTS[parsed.scheme]


# --- signatures ----------------------------------------------------------------------------------------------


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The `Janus-Signature` header value: `t=<timestamp>,v1=<hex HMAC-SHA256(secret, "<timestamp>." + body)>`."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify_signature(secret: str, header: str, body: bytes, tolerance: float = 300,
                     now: float | None = None) -> bool:
    """`header` signs `body` with `secret` at a time within `tolerance` seconds of `now` (a replayed old
    delivery fails). Any of several `v1=` values may match (a sender between two secrets)."""
    fields = [part.strip().partition("=") for part in header.split(",")]
    stamps = [value for key, _, value in fields if key == "t"]
    macs = [value for key, _, value in fields if key == "v1"]
    if len(stamps) != 1 or not stamps[0].isdigit() or not macs:
        return False
    timestamp = int(stamps[0])
    if abs((time.time() if now is None else now) - timestamp) > tolerance:
        return False
    expected = sign(secret, timestamp, body).rpartition("v1=")[2]
    return any(hmac.compare_digest(expected.encode(), mac.encode()) for mac in macs)


def delivery_id(job_id: str) -> str:
    """The `Janus-Delivery-Id` of a job's webhook: the same on every try."""
    return f"whd_{job_id}"


# --- one delivery --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """How one try went: delivered (2xx), retry (no answer, 5xx, 429) or rejected (any other answer, or an
    address refused now: not tried again). `status` is the receiver's HTTP status, if it answered."""

    result: Literal["delivered", "retry", "rejected"]
    status: int | None = None
    reason: str = ""


async def deliver(client: httpx.AsyncClient, url: str, body: bytes, delivery_id: str, secret: str,
                  settings: Settings) -> Outcome:
    """POST `body` to `url`, signed, within `settings.webhook_timeout`, to the address checked just now;
    redirects are not followed and the answer's body is not read."""
    try:
        parsed = _parse(url, settings)
    except BadRequest as exc:
        return Outcome("rejected", reason=str(exc))
    try:
        async with asyncio.timeout(settings.webhook_timeout):
            # the name may resolve elsewhere than at submit time: check again, and connect to what was checked
            address = await netcheck.resolve_checked(parsed.hostname or "", _port(parsed),
                                                     settings.allowed_webhook_hosts, HOSTS_SETTING)
            target = netcheck.pin(parsed, address)
            headers = {**target.headers, "Content-Type": "application/json", "User-Agent": USER_AGENT,
                       SIGNATURE_HEADER: sign(secret, int(time.time()), body), DELIVERY_ID_HEADER: delivery_id}
            async with client.stream("POST", target.url, content=body, headers=headers,
                                     extensions=target.extensions) as response:
                status = response.status_code
    except netcheck.HostUnresolved as exc:  # DNS may be back on the next try
        return Outcome("retry", reason=str(exc))
    except netcheck.AddressRefused as exc:
        return Outcome("rejected", reason=str(exc))
    except TimeoutError:
        return Outcome("retry", reason=f"no answer within {settings.webhook_timeout:g} s")
    except (httpx.HTTPError, OSError) as exc:
        return Outcome("retry", reason=printable(f"{type(exc).__name__}: {exc}", 300))
    if 200 <= status < 300:
        return Outcome("delivered", status)
    if status == 429 or status >= 500:
        return Outcome("retry", status)
    return Outcome("rejected", status)


GONE = Outcome("rejected", reason="the job is gone")  # nothing to send: the delivery is dropped


# --- the loop ------------------------------------------------------------------------------------------------


class WebhookDeliverer:
    """Takes due deliveries from the queue, sends them and settles them, until `close`. Any frontend may run one:
    the queue leases each delivery to one taker. Queue errors are logged and waited out; `run` never raises."""

    batch = 8  # deliveries taken and sent at once
    poll_interval = 0.5  # seconds between looks at the queue when nothing wakes us
    max_backoff = 30.0  # seconds between looks while the queue fails

    def __init__(self, queue: JobQueue, render: Callable[[str], Awaitable[dict[str, Any] | None]],
                 settings: Settings, metrics: Metrics | None = None) -> None:
        self._queue = queue
        self._render = render  # the job object sent for a job id; None: the job is gone
        self._settings = settings
        self._metrics = metrics
        self._wakeup = asyncio.Event()
        self._closed = False
        self._running: asyncio.Task[None] | None = None
        # No kept-alive connections: a pooled connection to a pinned address would carry a request for another
        # host name behind that address without checking that name's certificate.
        self._client = httpx.AsyncClient(timeout=settings.webhook_timeout, follow_redirects=False, trust_env=False,
                                         limits=httpx.Limits(max_connections=self.batch, max_keepalive_connections=0))

    @property
    def lease(self) -> float:
        """Seconds a taken delivery stays ours: a batch is sent at once, so one timeout plus the queue's answers."""
        return 2 * self._settings.webhook_timeout + 10

    def wake(self) -> None:
        """A job with a webhook just ended here: look at the queue now (call on the loop that runs `run`)."""
        self._wakeup.set()

    async def run(self) -> None:
        secret = self._settings.webhook_secret
        if not self._settings.allowed_webhook_hosts or secret is None or not secret.get_secret_value():
            log.info("webhooks are off (JANUS_ALLOWED_WEBHOOK_HOSTS or JANUS_WEBHOOK_SECRET unset): not delivering")
            return
        self._running = asyncio.current_task()
        backoff = self.poll_interval
        while not self._closed:
            try:
                taken = await self._queue.take_deliveries(self.batch, self.lease)
            except Exception as exc:
                log.warning("taking webhook deliveries failed (%s); looking again in %.1f s", exc, backoff)
                await self._pause(backoff)
                backoff = min(2 * backoff, self.max_backoff)
                continue
            backoff = self.poll_interval
            await asyncio.gather(*(self._send(d, secret.get_secret_value()) for d in taken))
            if len(taken) < self.batch:  # after a full batch, look again at once: more may be due
                await self._pause(self.poll_interval)

    async def close(self) -> None:
        """Stop taking deliveries; a batch in flight gets one delivery timeout to end. Then close the client."""
        self._closed = True
        self._wakeup.set()
        task = self._running
        if task is not None and task is not asyncio.current_task() and not task.done():
            done, _ = await asyncio.wait({task}, timeout=self._settings.webhook_timeout + 1)
            if not done:
                task.cancel()
                await asyncio.wait({task})
        await self._client.aclose()

    async def _pause(self, seconds: float) -> None:
        try:
            async with asyncio.timeout(seconds):
                await self._wakeup.wait()
        except TimeoutError:
            pass
        self._wakeup.clear()

    async def _send(self, delivery: Delivery, secret: str) -> None:
        """One try of one delivery, then tell the queue what is next. Never raises: where the queue cannot be
        told, the delivery is due again when its lease ends."""
        try:
            job = await self._render(delivery.job_id)
            if job is None:
                outcome = GONE
            else:
                body = json.dumps(job, separators=(",", ":")).encode()
                outcome = await deliver(self._client, delivery.url, body, delivery_id(delivery.job_id), secret,
                                        self._settings)
        except Exception as exc:  # rendering failed, or the client was closed under us: a try like any other
            outcome = Outcome("retry", reason=printable(f"{type(exc).__name__}: {exc}", 300))
        try:
            await self._settle(delivery, outcome)
        except Exception as exc:
            log.warning("webhook for job %s: the queue did not take the outcome of try %d (%s); it is due again "
                        "when its lease ends", delivery.job_id, delivery.attempt, exc)

    async def _settle(self, delivery: Delivery, outcome: Outcome) -> None:
        delays = self._settings.webhook_delays
        if outcome.result == "retry" and delivery.attempt <= len(delays):
            delay = delays[delivery.attempt - 1]
            self._report(delivery, "retry", outcome, f"; next try in {delay:g} s")
            await self._queue.delivery_retry(delivery.job_id, delay)
            return
        label = "dropped" if outcome is GONE else "failed" if outcome.result == "retry" else outcome.result
        self._report(delivery, label, outcome)
        await self._queue.delivery_done(delivery.job_id)

    def _report(self, delivery: Delivery, label: str, outcome: Outcome, then: str = "") -> None:
        if self._metrics is not None:
            self._metrics.webhook_deliveries.labels(label).inc()
        level = logging.INFO if label == "delivered" else logging.WARNING
        tries = len(self._settings.webhook_delays) + 1
        log.log(level, "webhook for job %s: %s on try %d of %d (status %s%s)%s", delivery.job_id, label,
                delivery.attempt, tries, outcome.status if outcome.status is not None else "none",
                f", {outcome.reason}" if outcome.reason else "", then,
                extra={"fields": {"job_id": delivery.job_id, "attempt": delivery.attempt, "outcome": label,
                                  "status": outcome.status}})
