"""The concurrent-job quota of an API key: how many of its generation jobs may be queued or running.

Each such job of a key with a quota (`unlimited` keys have none) has an empty marker object,
`active/<key id>/<job id>`, written when the job is accepted (right after its record, so a marker
without a record is always a leftover, which the next check at the limit sweeps) and removed when
it ends: every gateway sees every terminal event and removes the marker (`release`). To check
the quota, a gateway lists the key's markers; only when they reach the quota does it read their
records, and it removes markers of jobs that have ended (one whose terminal event no gateway was
up to see), so a stale marker never holds a slot for long.

Each gateway keeps a count per key: it lists the key's markers when its count is older than
REFRESH_S or a new job might not fit, so most submissions far below the limit list nothing.
Submissions that reach several gateways at the same instant can overshoot the quota by one job
per gateway.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from collections.abc import Set as AbstractSet
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import structlog
from aiohttp import web

from common.store import ObjectStore, active_key, active_prefix, job_id_of_active
from gateway.auth import API_KEY, OWNER
from gateway.errors import ApiError, store_call
from gateway.keys import KEYS, STORE
from schemas.jobs import JobRecord

log = structlog.get_logger("gateway.quota")

# How long a client that hit its quota is asked to wait before trying again.
QUOTA_RETRY_AFTER_S = 10

# At the limit, up to this many markers beyond it are checked too, so stale ones go in one sweep.
STALE_SWEEP = 50

# A gateway lists a key's markers again at least this often, and whenever a job might not fit.
REFRESH_S = 2.0


@dataclass(eq=False)
class _Submission:
    """A submission holding a slot; `job_id` once it writes its job's marker."""

    job_id: str | None = None


@dataclass
class _Count:
    """One key's jobs as this gateway sees them: far below the limit, no store listing is needed.
    Jobs are counted by id where known, so a job is counted once although its marker is listed
    while its submission is still in flight, or after it was accepted."""

    listed: set[str] = field(default_factory=set)  # jobs with a live marker at the last listing
    at: float = -REFRESH_S  # when (monotonic)
    since: set[str] = field(default_factory=set)  # jobs this gateway accepted after that listing began
    unnamed: int = 0  # of those, accepted without a marker's job id (none written)
    in_flight: set[_Submission] = field(default_factory=set)  # submissions holding a slot now
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def known(self) -> set[str]:
        """The jobs counted by this gateway apart from the listing: accepted since, or in flight."""
        return self.since | {s.job_id for s in self.in_flight if s.job_id is not None}

    def unknown(self) -> int:
        """Counted jobs without an id yet: submissions before their marker, accepted without one."""
        return self.unnamed + sum(s.job_id is None for s in self.in_flight)

    def used(self) -> int:
        return len(self.listed | self.known()) + self.unknown()


COUNTS = web.AppKey("quota_counts", dict)  # key id -> _Count, per gateway process
_SUBMISSION = "quota_submission"  # the request's _Submission while it holds a slot


def _counts(request: web.Request, mode: str) -> bool:
    """Whether the job counts against a quota: a generation job of a key that has one."""
    if mode == "download" or request.get(OWNER) is None or request.app[KEYS] is None:
        return False
    return request.app[KEYS].quota(request[API_KEY]) is not None


@asynccontextmanager
async def slot(request: web.Request, mode: str) -> AsyncIterator[None]:
    """A slot of the key's quota for one submission: 429 when none is free.

    The count errs on the safe side (a job accepted during a listing without its marker in it
    stays counted) and is corrected by the next listing, at the latest REFRESH_S later.
    """
    if not _counts(request, mode):
        yield
        return
    owner = request[OWNER]
    count = request.app[COUNTS].setdefault(owner, _Count())
    limit = request.app[KEYS].quota(request[API_KEY])
    assert limit is not None
    async with count.lock:
        now = time.monotonic()
        if now - count.at > REFRESH_S or count.used() + 1 > limit:
            # Jobs accepted while the listing runs may be missing from it: they stay counted.
            since, unnamed = set(count.since), count.unnamed
            count.listed = await store_call(
                _active_jobs(request.app[STORE], owner, limit, count.known(), count.unknown())
            )
            count.at, count.since, count.unnamed = now, count.since - since, count.unnamed - unnamed
        if count.used() >= limit:
            raise ApiError(
                429,
                "quota_exceeded",
                f"this API key already has {count.used()} job{'s' if count.used() != 1 else ''} queued or running "
                f"(limit {limit}); retry when one ends",
                headers={"Retry-After": str(QUOTA_RETRY_AFTER_S)},
            )
        submission = request[_SUBMISSION] = _Submission()
        count.in_flight.add(submission)
    accepted = False
    try:
        yield
        accepted = True
    finally:
        count.in_flight.discard(submission)
        if accepted and submission.job_id is not None:
            count.since.add(submission.job_id)
        elif accepted:
            count.unnamed += 1


async def _active_jobs(
    store: ObjectStore,
    owner: str,
    limit: int,
    known: AbstractSet[str] = frozenset(),
    unknown: int = 0,
) -> set[str]:
    """The jobs of the key's markers. When they, with the jobs this gateway counts apart from
    them (`known` by id, `unknown` more), would reach the limit, each marker is checked against its
    job's record first, and those of ended jobs (and leftovers without a record) are removed: a
    stale marker never refuses a job. Markers of `known` jobs are this gateway's own, live."""
    keys = await store.list_keys(active_prefix(owner), None, limit + STALE_SWEEP)
    jobs = {job_id_of_active(k): k for k in keys}
    if len(jobs.keys() | known) + unknown < limit:
        return set(jobs)
    unsure = [job_id for job_id in jobs if job_id not in known]
    records = await asyncio.gather(*(store.get_record(job_id) for job_id in unsure))
    for job_id, record in zip(unsure, records, strict=True):
        if record is None or record.status.is_terminal:
            log.info("quota_marker_cleared", marker=jobs[job_id])
            await store.delete(jobs.pop(job_id))
    return set(jobs)


async def hold(request: web.Request, mode: str, job_id: str) -> None:
    """Count the job against its key (called with the slot held, once the job's record is stored)."""
    if _counts(request, mode):
        if (submission := request.get(_SUBMISSION)) is not None:
            submission.job_id = job_id  # from now on it may be listed: counted once, by its id
        await request.app[STORE].put_bytes(active_key(request[OWNER], job_id), b"", "application/octet-stream")


async def release(store: ObjectStore, record: JobRecord) -> None:
    """The job ended: it no longer counts against its key."""
    if record.owner is not None and record.mode != "download":
        await store.delete(active_key(record.owner, record.job_id))
