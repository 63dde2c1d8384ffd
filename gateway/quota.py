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


@dataclass
class _Count:
    """One key's jobs as this gateway sees them: far below the limit, no store listing is needed."""

    listed: int = 0  # markers at the last listing
    at: float = -REFRESH_S  # when (monotonic)
    since: int = 0  # jobs this gateway accepted after that listing began
    in_flight: int = 0  # submissions holding a slot now
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def used(self) -> int:
        return self.listed + self.since + self.in_flight


COUNTS = web.AppKey("quota_counts", dict)  # key id -> _Count, per gateway process


def _counts(request: web.Request, mode: str) -> bool:
    """Whether the job counts against a quota: a generation job of a key that has one."""
    if mode == "download" or request.get(OWNER) is None or request.app[KEYS] is None:
        return False
    return request.app[KEYS].quota(request[API_KEY]) is not None


@asynccontextmanager
async def slot(request: web.Request, mode: str) -> AsyncIterator[None]:
    """A slot of the key's quota for one submission: 429 when none is free.

    The count errs on the safe side (a job accepted during a listing may count twice) and is
    corrected by the next listing, at the latest REFRESH_S later.
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
            since = count.since
            count.listed = await store_call(_active_jobs(request.app[STORE], owner, limit))
            count.at, count.since = now, count.since - since
        if count.used() >= limit:
            raise ApiError(
                429,
                "quota_exceeded",
                f"this API key already has {count.used()} job{'s' if count.used() != 1 else ''} queued or running "
                f"(limit {limit}); retry when one ends",
                headers={"Retry-After": str(QUOTA_RETRY_AFTER_S)},
            )
        count.in_flight += 1
    accepted = False
    try:
        yield
        accepted = True
    finally:
        count.in_flight -= 1
        count.since += accepted


async def _active_jobs(store: ObjectStore, owner: str, limit: int) -> int:
    keys = await store.list_keys(active_prefix(owner), None, limit + STALE_SWEEP)
    if len(keys) < limit:
        return len(keys)
    # At the limit: make sure each marker still stands for a job that has not ended.
    records = await asyncio.gather(*(store.get_record(job_id_of_active(k)) for k in keys))
    live = 0
    for key, record in zip(keys, records, strict=True):
        if record is None or record.status.is_terminal:
            log.info("quota_marker_cleared", marker=key)
            await store.delete(key)
        else:
            live += 1
    return live


async def hold(request: web.Request, mode: str, job_id: str) -> None:
    """Count the job against its key (called with the slot held, once the job's record is stored)."""
    if _counts(request, mode):
        await request.app[STORE].put_bytes(active_key(request[OWNER], job_id), b"", "application/octet-stream")


async def release(store: ObjectStore, record: JobRecord) -> None:
    """The job ended: it no longer counts against its key."""
    if record.owner is not None and record.mode != "download":
        await store.delete(active_key(record.owner, record.job_id))
