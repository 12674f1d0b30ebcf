"""The job queue contract between frontends (REST, gRPC) and workers.

Frontend half: `submit` a job (admission control raises `QueueFull`), iterate its `events` until the
terminal one, `cancel` it. Worker half: `claim` up to N jobs, `publish` progress, `finish` with the
terminal event (which stores the result and acknowledges the job), `is_cancelled` between steps,
`heartbeat`. Backends: `MemoryQueue` (one process) and `RedisQueue` (Redis Streams).
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

from server.jobs import Job, JobState


class QueueFull(Exception):
    """Admission control refused the job; `retry_after` is a hint in seconds."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class QueueUnavailable(Exception):
    """The queue backend cannot be reached right now; `retry_after` is a hint in seconds."""

    def __init__(self, message: str, retry_after: float = 2.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class IdempotencyConflict(Exception):
    """The idempotency key already names a job that asked for something else (`job_id`)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"this Idempotency-Key was already used for a different request (job {job_id}); "
                         "use a new key for a new request")
        self.job_id = job_id


class QueueMisconfigured(Exception):
    """The backend refused us (credentials, TLS): no retry will help, so processes stop at start-up."""


@dataclass(frozen=True)
class Delivery:
    """A webhook delivery that is due: the job whose object is sent, where to, and which try this is (1-based).
    Taken with a lease: if the taker dies before `delivery_done` / `delivery_retry`, it is due again when the
    lease ends (at least once)."""

    job_id: str
    url: str
    attempt: int


class JobQueue(abc.ABC):
    # --- frontend side ---
    @abc.abstractmethod
    async def submit(self, job: Job) -> str:
        """Enqueue `job`; returns the id to follow. A job with the `idempotency_key` of an earlier one is
        not enqueued: the earlier one's id comes back while it runs or its result is kept (same
        `fingerprint`), or `IdempotencyConflict` (another fingerprint). A key whose job failed is
        released: the retry runs."""

    @abc.abstractmethod
    def events(self, job_id: str) -> AsyncIterator[dict[str, Any]]:
        """Events of a job in order, ending with (and including) its terminal `result`/`error` event."""

    @abc.abstractmethod
    async def cancel(self, job_id: str) -> None:
        """Ask the worker to stop the job at its next step; a queued job will not run."""

    @abc.abstractmethod
    async def depth(self) -> int:
        """Jobs waiting or running (not yet finished)."""

    @abc.abstractmethod
    async def ping(self) -> bool:
        """The backend is reachable."""

    @abc.abstractmethod
    async def live_workers(self, max_age: float) -> set[str]:
        """Ids of the workers that sent a heartbeat within `max_age` seconds."""

    async def workers(self) -> dict[str, dict[str, Any]]:
        """Workers heard from lately: the info of each one's last heartbeat plus `last_seen` (epoch seconds)."""
        return {}

    async def workers_alive(self, max_age: float) -> bool:
        """Some worker sent a heartbeat within `max_age` seconds."""
        return bool(await self.live_workers(max_age))

    async def verify(self) -> None:  # noqa: B027 - optional hook
        """Check at start-up what no retry can fix (credentials, TLS); raises `QueueMisconfigured`."""

    # --- worker side ---
    @abc.abstractmethod
    async def claim(self, worker_id: str, max_jobs: int, timeout: float) -> list[Job]:
        """Take up to `max_jobs` jobs, waiting at most `timeout` seconds for the first one."""

    @abc.abstractmethod
    async def publish(self, job_id: str, event: dict[str, Any]) -> None:
        """Send a non-terminal event (delta, progress, preview) to whoever follows the job. Previews are for
        watching a job run: a queue drops them when the job ends (followers that had not read them skip them)."""

    @abc.abstractmethod
    async def finish(self, job_id: str, event: dict[str, Any]) -> None:
        """Store the terminal event, announce it, and acknowledge the job."""

    @abc.abstractmethod
    async def is_cancelled(self, job_id: str) -> bool: ...

    @abc.abstractmethod
    async def heartbeat(self, worker_id: str, info: dict[str, Any] | None = None) -> None: ...

    async def cancelled(self, job_ids: Iterable[str]) -> set[str]:
        """The subset of `job_ids` that should stop; backends may answer in one round trip."""
        return {job_id for job_id in job_ids if await self.is_cancelled(job_id)}

    async def release(self, worker_id: str, job_ids: Iterable[str]) -> bool:
        """Hand claimed jobs back for another delivery (a failure that may not recur elsewhere).

        Returns False where the backend cannot redeliver; the worker then reports the failure.
        Redelivered jobs count towards the dead-letter limit, so a poison job still ends.
        """
        return False

    # --- async jobs (those with `Job.surface`): their records, kept for `Job.ttl` once they end ---

    @abc.abstractmethod
    async def job_state(self, job_id: str) -> JobState | None:
        """The record of an async job with where it is now and its terminal event; None if unknown or expired."""

    @abc.abstractmethod
    async def job_states(self, owner: str, limit: int, status: str | None = None) -> list[JobState]:
        """`owner`'s async jobs, newest first, at most `limit` (of status `status` if given); terminal events
        only for failures (results can be megabytes)."""

    @abc.abstractmethod
    async def end(self, job_id: str, event: dict[str, Any]) -> bool:
        """Finish a job from the frontend (a cancel): store `event` unless the job already has its terminal
        event, and stop it (a queued job never runs; a worker running it stops at its next step).
        True if `event` was stored."""

    # --- webhook deliveries (queued when an async job with a webhook ends; taken by any frontend) ---

    async def take_deliveries(self, limit: int, lease: float) -> list[Delivery]:
        """Up to `limit` deliveries due now, each leased to the caller for `lease` seconds."""
        return []

    async def delivery_done(self, job_id: str) -> None:  # noqa: B027 - optional hook
        """The delivery succeeded or is given up: never again."""

    async def delivery_retry(self, job_id: str, delay: float) -> None:  # noqa: B027 - optional hook
        """Try the delivery again in `delay` seconds."""

    def counters(self) -> dict[str, int]:
        """Cumulative counts the backend keeps (e.g. redeliveries, dead_letters)."""
        return {}

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""
