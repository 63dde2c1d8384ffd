"""Event streams for clients (WebSocket and Server-Sent Events): history first, then live.

Order of operations is what makes a stream gap-free: subscribe to this gateway's live events,
then read each job's record. The record holds every event up to its `seq` (the worker writes it
before it publishes), and any later event reaches the subscription. Events are then sent per job
in `seq` order, each once, starting after the client's `since`.

A live event can still fail to arrive (it was published without a confirm while the broker went
away, or while this gateway's events queue was being declared again after a reconnect). A
stream of listed jobs reads a job's record again when a live event of it skips a `seq` (and
sends the ones between first), and when the job has had no event for RECHECK_S (then twice that,
up to RECHECK_MAX_S, while it stays quiet), and sends what it missed: no gap, and the stream
still ends when its jobs do.
"""

from __future__ import annotations

import asyncio
import enum
import sys
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiohttp import web

from gateway.auth import owner_of, visible
from gateway.errors import ApiError
from gateway.handlers import ascii_int, parse_job_id
from gateway.keys import HUB, SETTINGS, STORE, STREAMS
from gateway.views import event_frame
from schemas.errors import shown
from schemas.jobs import JobRecord
from schemas.messages import JobEvent

MAX_JOBS_PER_STREAM = 100
# The longest integer Python reads (sys.get_int_max_str_digits()): a longer seq is refused as such.
MAX_SEQ_DIGITS = sys.get_int_max_str_digits()
# How long one frame may take to reach a client's connection before the stream ends.
SEND_TIMEOUT_S = 30.0
# A listed job without an event for this long is read again (the pause doubling up to the max
# while the job stays quiet, so that streams of jobs waiting in a queue read little).
RECHECK_S = 10.0
RECHECK_MAX_S = 60.0
# Records one stream reads at once when it reads them again (its live events wait meanwhile).
RECHECK_CONCURRENCY = 10
# Jobs whose last seq sent an `all=true` stream remembers (to drop the broker's late copies of
# events it sent); the oldest are forgotten, so a stream left open for weeks stays small.
ALL_JOBS_MEMORY = 10_000

log = structlog.get_logger("gateway.streams")


# Prefix of the SSE id of a stream of several jobs: `seqs:<s1>,<s2>,...`, the last seq sent of each
# listed job in the order of the request's job_id parameters (-1: none yet).
POSITIONS = "seqs:"


@dataclass
class StreamRequest:
    job_ids: list[str] | None  # None: every job of the caller
    since: int = -1  # for every listed job, unless `after` names its own
    owner: str | None = None  # the caller's API key id (None: auth disabled)
    after: dict[str, int] = field(default_factory=dict)  # job id -> the last seq the client has

    def since_of(self, job_id: str) -> int:
        return self.after.get(job_id, self.since)

    @classmethod
    def parse(cls, request: web.Request, last_event_id: str | None = None) -> StreamRequest:
        query, owner = request.query, owner_of(request)
        if "all" in query:
            if query.getone("all") not in ("1", "true"):
                raise ApiError(
                    400,
                    "bad_parameter",
                    f"all must be true (or 1) to follow all your jobs; leave it out to follow job_id values, "
                    f"got {shown(query.getone('all'))}",
                )
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
        job_ids = list(dict.fromkeys(job_ids))
        since_text = query.get("since", last_event_id)
        if since_text is None:
            return cls(job_ids, owner=owner)
        source = "since" if "since" in query else "Last-Event-ID"
        if source == "Last-Event-ID" and since_text.startswith(POSITIONS):
            return cls(job_ids, owner=owner, after=_positions(since_text, job_ids))
        if len(job_ids) != 1:
            raise ApiError(
                400,
                "bad_parameter",
                f"{source} {shown(since_text)} applies to one job: give exactly one job_id with it (a stream of "
                f"several jobs resumes by the Last-Event-ID of its events, {POSITIONS}...)",
            )
        job_part, colon, seq_part = since_text.rpartition(":")
        if colon and job_part != job_ids[0]:
            raise ApiError(400, "bad_parameter", f"{source} names job {shown(job_part)}, not {job_ids[0]!r}")
        return cls(job_ids, _seq(seq_part, since_text, source), owner)


def _seq(text: str, whole: str, source: str) -> int:
    """The seq in `text`, part of the value `whole` of `since` or `Last-Event-ID` (`source`)."""
    try:
        seq = ascii_int(text)
    except ValueError as exc:
        what = "integers" if len(text) <= MAX_SEQ_DIGITS else f"integers of at most {MAX_SEQ_DIGITS} digits"
        raise ApiError(400, "bad_parameter", f"{source} must hold event seqs ({what}), got {shown(whole)}") from exc
    if seq < 0:
        raise ApiError(400, "bad_parameter", f"{source} must hold event seqs (0 or more), got {shown(whole)}")
    return seq


def _positions(text: str, job_ids: list[str]) -> dict[str, int]:
    """A Last-Event-ID of a stream of several jobs: one seq per job, in the order of its job_ids."""
    seqs = text.removeprefix(POSITIONS).split(",")
    if len(seqs) != len(job_ids):
        raise ApiError(
            400,
            "bad_parameter",
            f"Last-Event-ID {shown(text)} holds {len(seqs)} positions; this stream lists {len(job_ids)} jobs",
        )
    after = {}
    for job_id, seq in zip(job_ids, seqs, strict=True):
        if seq != "-1":
            after[job_id] = _seq(seq, text, "Last-Event-ID")
    return after


class Ended(enum.Enum):
    """Why a stream's frames ended (the WebSocket's close code says it)."""

    DONE = "done"  # every listed job has ended, and its end was sent
    TOO_SLOW = "too_slow"  # the client fell more than SUBSCRIBER_BACKLOG events behind
    GAP = "gap"  # a live event skipped seqs that the job's record could not be read for
    SHUTDOWN = "shutdown"  # the gateway is stopping


@dataclass
class JobStream:
    """Frames for a client. Ends when every listed job has ended (never, for all jobs)."""

    app: web.Application
    request: StreamRequest
    records: dict[str, JobRecord]
    _sub: Any
    _last: OrderedDict[str, int] = field(default_factory=OrderedDict)
    ended: Ended | None = None  # why `frames` ended; None while it runs, or if it failed

    @property
    def overflowed(self) -> bool:
        """The client fell more than SUBSCRIBER_BACKLOG events behind: the stream ended early."""
        return self._sub.overflowed

    @property
    def already_over(self) -> bool:
        """Resumed at or after the terminal event of every job it lists: nothing will come."""
        return self.request.job_ids is not None and all(
            record.status.is_terminal and self.request.since_of(record.job_id) >= record.seq
            for record in self.records.values()
        )

    def _sent(self, job_id: str, seq: int) -> None:
        self._last[job_id] = seq
        if self.request.job_ids is None:  # all=true: remember the jobs seen last, not every one
            self._last.move_to_end(job_id)
            while len(self._last) > ALL_JOBS_MEMORY:
                self._last.popitem(last=False)

    def event_id(self, frame: dict[str, Any]) -> str:
        """The SSE id of a frame just sent: `<job_id>:<seq>`, or on a stream of several listed jobs
        the position of each (`seqs:...`), which resumes all of them as a Last-Event-ID."""
        job_ids = self.request.job_ids
        if job_ids is None or len(job_ids) == 1:
            return f"{frame['job_id']}:{frame['seq']}"
        return POSITIONS + ",".join(str(self._last.get(job_id, -1)) for job_id in job_ids)

    async def frames(self) -> AsyncIterator[dict[str, Any]]:
        store, expiry = self.app[STORE], self.app[SETTINGS].presign_expiry_s
        open_jobs = set(self.records)
        pending: list[JobEvent] = []
        loop = asyncio.get_running_loop()
        # Listed streams only; the first reads spread over RECHECK_S, not all at once.
        quiet = {
            job_id: _Quiet(loop.time() + RECHECK_S * n / len(self.records)) for n, job_id in enumerate(self.records)
        }
        for record in self.records.values():
            self._last[record.job_id] = self.request.since_of(record.job_id)
            pending += _history(record)
            if record.status.is_terminal and self.request.since_of(record.job_id) >= record.seq:
                open_jobs.discard(record.job_id)  # the client saw the end already: nothing more will come
        # The wait for the next live event, kept across timeouts: a cancel of this generator is
        # never lost to an event that arrives at the same moment (as `wait_for` can on 3.11).
        getter: asyncio.Future[JobEvent | None] | None = None
        try:
            while True:
                for event in pending:
                    # Already sent (or before `since`): never a duplicate or a step backwards.
                    if event.seq > self._last.get(event.job_id, -1):
                        self._sent(event.job_id, event.seq)
                        yield event_frame(event, store, expiry)
                    # The job's end ends its part of the stream, also when `since` was past it.
                    if event.status.is_terminal and self.request.job_ids is not None:
                        open_jobs.discard(event.job_id)
                        if not open_jobs:
                            self.ended = Ended.DONE
                            return
                if self.request.job_ids is not None and not open_jobs:
                    self.ended = Ended.DONE
                    return
                now = loop.time()
                if due := {job_id for job_id in open_jobs if quiet[job_id].due <= now}:
                    pending, _ = await self._missed(due)
                    for job_id in due:
                        quiet[job_id].checked(loop.time(), found=any(e.job_id == job_id for e in pending))
                    continue
                wait = min((quiet[job_id].due for job_id in open_jobs), default=None)
                if getter is None:
                    getter = asyncio.ensure_future(self._sub.queue.get())
                done, _ = await asyncio.wait({getter}, timeout=None if wait is None else max(0.0, wait - now))
                if not done:
                    pending = []
                    continue
                first, getter = getter.result(), None
                if first is None:
                    self.ended = Ended.SHUTDOWN
                    return
                if self._sub.overflowed:  # too far behind: the client resumes from the record
                    log.warning("stream_too_slow", job_ids=self.request.job_ids, owner=self.request.owner)
                    self.ended = Ended.TOO_SLOW
                    return
                pending = [first]
                while not self._sub.queue.empty():
                    event = self._sub.queue.get_nowait()
                    if event is None:
                        self._sub.queue.put_nowait(None)
                        break
                    pending.append(event)
                pending.sort(key=lambda e: (e.job_id, e.seq))
                if quiet:  # a stream of listed jobs
                    for job_id in {e.job_id for e in pending} & quiet.keys():
                        quiet[job_id].heard(loop.time())
                    # Live events that skip a seq: the ones between are in the job's record.
                    if skipped := _skipping(pending, self._last) & quiet.keys():
                        missed, unread = await self._missed(skipped)
                        if unread:  # sending on would leave a gap for good: the client resumes instead
                            log.warning("stream_gap_unfilled", job_ids=sorted(unread))
                            self.ended = Ended.GAP
                            return
                        pending = sorted(pending + missed, key=lambda e: (e.job_id, e.seq))
        finally:
            if getter is not None:
                getter.cancel()

    async def _missed(self, jobs: set[str]) -> tuple[list[JobEvent], set[str]]:
        """The events of these jobs in their records that the stream has not sent, and the jobs
        whose records could not be read (RECHECK_CONCURRENCY at a time)."""
        limit = asyncio.Semaphore(RECHECK_CONCURRENCY)

        async def read(job_id: str) -> JobRecord | None:
            async with limit:
                return await self.app[STORE].get_record(job_id)

        ordered = sorted(jobs)
        records = await asyncio.gather(*(read(job_id) for job_id in ordered), return_exceptions=True)
        missed: list[JobEvent] = []
        unread: set[str] = set()
        for job_id, record in zip(ordered, records, strict=True):
            if isinstance(record, Exception):  # the store is down: try again at the next recheck
                log.warning("stream_recheck_failed", job_id=job_id, error=str(record))
                unread.add(job_id)
                continue
            if isinstance(record, BaseException):
                raise record
            if record is None:
                continue
            events = [event for event in _history(record) if event.seq > self._last.get(job_id, -1)]
            if events:
                log.warning("stream_events_missed", job_id=job_id, seqs=[event.seq for event in events])
            missed += events
        return missed, unread


def _skipping(events: list[JobEvent], last: dict[str, int]) -> set[str]:
    """The jobs whose events here, after the last seq sent of each, leave a seq out."""
    seqs: dict[str, set[int]] = {}
    for event in events:
        seqs.setdefault(event.job_id, set()).add(event.seq)
    return {
        job_id
        for job_id, have in seqs.items()
        if any(seq not in have for seq in range(last.get(job_id, -1) + 1, max(have)))
    }


class _Quiet:
    """When a listed job of a stream is next read again, having had no event."""

    def __init__(self, now: float) -> None:
        self.pause = RECHECK_S
        self.due = now + RECHECK_S

    def heard(self, now: float) -> None:
        self.pause = RECHECK_S
        self.due = now + self.pause

    def checked(self, now: float, found: bool) -> None:
        self.pause = RECHECK_S if found else min(self.pause * 2, RECHECK_MAX_S)
        self.due = now + self.pause


def _history(record: JobRecord) -> list[JobEvent]:
    """A record's events, from its history (a record stored before it kept one: its latest)."""
    entries = list(record.events)
    if not entries or entries[-1].seq != record.seq:
        entries.append(record.last_event())
    return [JobEvent.from_entry(record.job_id, entry, record) for entry in entries]


@asynccontextmanager
async def open_stream(app: web.Application, request: StreamRequest) -> AsyncIterator[JobStream]:
    """Subscribe first, then read the records (404 for an unknown job, or another key's) — see the
    module docstring. A key holds at most `max_streams_per_key` streams open at once."""
    owner, limit = request.owner or "", app[SETTINGS].max_streams_per_key
    counts: dict[str, int] = app[STREAMS]
    if counts.get(owner, 0) >= limit:
        raise ApiError(
            429,
            "too_many_streams",
            f"this API key has {limit} streams open on this gateway, as many as it may "
            "(VIDEOGEN_MAX_STREAMS_PER_KEY); close one, or follow several jobs in one stream",
            headers={"Retry-After": "5"},
        )
    counts[owner] = counts.get(owner, 0) + 1
    try:
        async with _subscribed(app, request) as stream:
            yield stream
    finally:
        counts[owner] -= 1
        if not counts[owner]:
            del counts[owner]


@asynccontextmanager
async def _subscribed(app: web.Application, request: StreamRequest) -> AsyncIterator[JobStream]:
    with app[HUB].subscribe(request.job_ids, request.owner) as sub:
        records: dict[str, JobRecord] = {}
        for job_id in request.job_ids or ():
            record = await app[STORE].get_record(job_id)
            if record is None or not visible(record, request.owner):
                raise ApiError(404, "job_not_found", f"no job with id {job_id!r}")
            records[job_id] = record
        yield JobStream(app, request, records, sub)


async def pump(frames: AsyncIterator[dict[str, Any]], send: Any, client_gone: asyncio.Future[Any]) -> bool:
    """Send frames until the stream ends or the client goes away. False if a frame was not taken
    by the client's connection within SEND_TIMEOUT_S (its transport is best aborted)."""
    iterator = frames.__aiter__()
    step: asyncio.Future[dict[str, Any]] | None = None
    try:
        while True:
            step = asyncio.ensure_future(iterator.__anext__())
            done, _ = await asyncio.wait({step, client_gone}, return_when=asyncio.FIRST_COMPLETED)
            if step not in done:
                return True
            try:
                frame = step.result()
            except StopAsyncIteration:
                return True
            # A client that takes no data (its receive window full) must not hold the stream for ever.
            await asyncio.wait_for(send(frame), SEND_TIMEOUT_S)
    except TimeoutError:
        return False
    except (ConnectionResetError, ConnectionError):
        return True
    finally:
        # Also when this task is cancelled: the generator is still inside `step` until that ends.
        if step is not None and not step.done():
            step.cancel()
            await asyncio.gather(step, return_exceptions=True)
        await iterator.aclose()
