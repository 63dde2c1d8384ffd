"""The concurrent-job quota of an API key: how many of its generation jobs may be queued or running.

Each such job has an empty marker object, `active/<key id>/<job id>`, written when the job is
accepted (before its record and inputs, so a failed submission leaves at most a marker without a
record, which the next check at the limit sweeps) and removed when it ends: every gateway sees
every terminal event and removes the marker (`release`). To check the quota, a gateway lists the
key's markers; only when they reach the quota does it read their records, and it removes markers
of jobs that have ended (one whose terminal event no gateway was up to see), so a stale marker
never holds a slot for long.

Submissions of one key are checked one at a time within a gateway. Submissions that reach several
gateways at the same instant can overshoot the quota by one job per gateway.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from weakref import WeakValueDictionary

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

_locks: WeakValueDictionary[str, asyncio.Lock] = WeakValueDictionary()


def _counts(request: web.Request, mode: str) -> bool:
    return mode != "download" and request.get(OWNER) is not None and request.app[KEYS] is not None


@asynccontextmanager
async def slot(request: web.Request, mode: str) -> AsyncIterator[None]:
    """Hold the key's quota check until the job is accepted (or refused): 429 when it is full."""
    if not _counts(request, mode):
        yield
        return
    owner = request[OWNER]
    lock = _locks.get(owner)
    if lock is None:
        lock = _locks[owner] = asyncio.Lock()
    async with lock:
        limit = request.app[KEYS].quota(request[API_KEY])
        active = await store_call(_active_jobs(request.app[STORE], owner, limit))
        if active >= limit:
            raise ApiError(
                429,
                "quota_exceeded",
                f"this API key already has {active} jobs queued or running (limit {limit}); retry when one ends",
                headers={"Retry-After": str(QUOTA_RETRY_AFTER_S)},
            )
        yield


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
    """Count the job against its key (called with the slot held, before the job's record is stored)."""
    if _counts(request, mode):
        await request.app[STORE].put_bytes(active_key(request[OWNER], job_id), b"", "application/octet-stream")


async def release(store: ObjectStore, record: JobRecord) -> None:
    """The job ended: it no longer counts against its key."""
    if record.owner is not None and record.mode != "download":
        await store.delete(active_key(record.owner, record.job_id))
