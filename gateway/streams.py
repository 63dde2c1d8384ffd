"""Event streams for clients (WebSocket and Server-Sent Events): history first, then live.

Order of operations is what makes a stream gap-free: subscribe to this gateway's live events,
then read each job's record. The record holds every event up to its `seq` (the worker writes it
before it publishes), and any later event reaches the subscription. Events are then sent per job
in `seq` order, each once, starting after the client's `since`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from gateway.auth import owner_of, visible
from gateway.errors import ApiError
from gateway.handlers import ascii_int, parse_job_id
from gateway.keys import HUB, SETTINGS, STORE
from gateway.views import event_frame
from schemas.jobs import JobRecord
from schemas.messages import JobEvent

MAX_JOBS_PER_STREAM = 100


@dataclass
class StreamRequest:
    job_ids: list[str] | None  # None: every job of the caller
    since: int = -1
    owner: str | None = None  # the caller's API key id (None: auth disabled)

    @classmethod
    def parse(cls, request: web.Request, last_event_id: str | None = None) -> StreamRequest:
        query, owner = request.query, owner_of(request)
        if query.get("all") in ("1", "true"):
            if "job_id" in query or "since" in query:
                raise ApiError(
                    400, "bad_parameter", "all=true takes neither job_id nor since (it streams live events only)"
                )
            return cls(None, owner=owner)
        job_ids = [parse_job_id(v) for v in query.getall("job_id", [])]
        if not job_ids:
            raise ApiError(
                400,
                "missing_parameter",
                "query parameter job_id is required (repeat it for several jobs, or use all=true)",
            )
        if len(set(job_ids)) > MAX_JOBS_PER_STREAM:
            raise ApiError(400, "bad_parameter", f"at most {MAX_JOBS_PER_STREAM} job_id values per stream")
        since_text = query.get("since", last_event_id)
        if since_text is None:
            return cls(list(dict.fromkeys(job_ids)), owner=owner)
        if len(set(job_ids)) != 1:
            raise ApiError(400, "bad_parameter", "since applies to one job: give exactly one job_id with it")
        job_part, _, seq_part = since_text.rpartition(":")
        if job_part and job_part != job_ids[0]:
            raise ApiError(400, "bad_parameter", f"since/Last-Event-ID names job {job_part!r}, not {job_ids[0]!r}")
        try:
            since = ascii_int(seq_part)
        except ValueError as exc:
            raise ApiError(
                400, "bad_parameter", f"since must be an event seq (an integer), got {since_text!r}"
            ) from exc
        if since < 0:
            raise ApiError(400, "bad_parameter", f"since must be an event seq (0 or more), got {since_text!r}")
        return cls(job_ids[:1], since, owner)


@dataclass
class JobStream:
    """Frames for a client. Ends when every listed job has ended (never, for all jobs)."""

    app: web.Application
    request: StreamRequest
    records: dict[str, JobRecord]
    _sub: Any
    _last: dict[str, int] = field(default_factory=dict)

    @property
    def already_over(self) -> bool:
        """Resumed at or after the terminal event of every job it lists: nothing will come."""
        return self.request.job_ids is not None and all(
            record.status.is_terminal and self.request.since >= record.seq for record in self.records.values()
        )

    async def frames(self) -> AsyncIterator[dict[str, Any]]:
        store, expiry = self.app[STORE], self.app[SETTINGS].presign_expiry_s
        open_jobs = set(self.records)
        pending: list[JobEvent] = []
        for record in self.records.values():
            self._last[record.job_id] = self.request.since
            pending += [JobEvent.from_entry(record.job_id, entry, record) for entry in record.events]
            if record.status.is_terminal and self.request.since >= record.seq:
                open_jobs.discard(record.job_id)  # the client saw the end already: nothing more will come
        while True:
            for event in pending:
                # Already sent (or before `since`): never a duplicate or a step backwards.
                if event.seq > self._last.get(event.job_id, -1):
                    self._last[event.job_id] = event.seq
                    yield event_frame(event, store, expiry)
                # The job's end ends its part of the stream, also when `since` was past it.
                if event.status.is_terminal and self.request.job_ids is not None:
                    open_jobs.discard(event.job_id)
                    if not open_jobs:
                        return
            if self.request.job_ids is not None and not open_jobs:
                return
            first = await self._sub.queue.get()
            if first is None:
                return  # the gateway is shutting down
            pending = [first]
            while not self._sub.queue.empty():
                event = self._sub.queue.get_nowait()
                if event is None:
                    self._sub.queue.put_nowait(None)
                    break
                pending.append(event)
            pending.sort(key=lambda e: (e.job_id, e.seq))


@asynccontextmanager
async def open_stream(app: web.Application, request: StreamRequest) -> AsyncIterator[JobStream]:
    """Subscribe first, then read the records (404 for an unknown job, or another key's) — see the
    module docstring."""
    with app[HUB].subscribe(request.job_ids, request.owner) as sub:
        records: dict[str, JobRecord] = {}
        for job_id in request.job_ids or ():
            record = await app[STORE].get_record(job_id)
            if record is None or not visible(record, request.owner):
                raise ApiError(404, "job_not_found", f"no job with id {job_id!r}")
            records[job_id] = record
        yield JobStream(app, request, records, sub)


async def pump(frames: AsyncIterator[dict[str, Any]], send: Any, client_gone: asyncio.Future[Any]) -> None:
    """Send frames until the stream ends or the client goes away."""
    iterator = frames.__aiter__()
    try:
        while True:
            step = asyncio.ensure_future(iterator.__anext__())
            done, _ = await asyncio.wait({step, client_gone}, return_when=asyncio.FIRST_COMPLETED)
            if step not in done:
                step.cancel()
                await asyncio.gather(step, return_exceptions=True)
                return
            try:
                frame = step.result()
            except StopAsyncIteration:
                return
            await send(frame)
    except (ConnectionResetError, ConnectionError):
        return
    finally:
        await iterator.aclose()
