"""The quota's check at the limit, against a fake store that behaves like the real one."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

import pytest

from common.store import active_key, job_id_of_active
from gateway.auth import API_KEY
from gateway.auth import OWNER as OWNER_KEY
from gateway.errors import ApiError
from gateway.keys import KEYS, STORE
from gateway.quota import COUNTS, _active_jobs, hold, slot
from schemas.jobs import JobRecord, JobStatus, Phase, utcnow
from tests.helpers import tiny_params

OWNER = "alice"
PARAMS = tiny_params()


class FakeStore:
    def __init__(self) -> None:
        self.markers: set[str] = set()
        self.records: dict[str, JobRecord] = {}

    async def list_keys(self, prefix: str, start_after: str | None, limit: int) -> list[str]:
        return sorted(k for k in self.markers if k.startswith(prefix))[:limit]

    async def get_record(self, job_id: str) -> JobRecord | None:
        return self.records.get(job_id)

    async def delete(self, key: str) -> None:
        self.markers.discard(key)


def record(job_id: str, status: JobStatus) -> JobRecord:
    now = utcnow()
    return JobRecord(
        job_id=job_id,
        mode="text-to-video",
        model="ltx-tiny",
        status=status,
        phase={JobStatus.QUEUED: Phase.QUEUED, JobStatus.RUNNING: Phase.DENOISING}.get(status, Phase.SUCCEEDED),
        progress=0.0,
        seq=0,
        created_at=now,
        updated_at=now,
        owner=OWNER,
        params=PARAMS,
    )


async def test_at_the_limit_markers_of_ended_jobs_and_leftovers_are_cleared() -> None:
    store = FakeStore()
    cases = {"live": JobStatus.QUEUED, "running": JobStatus.RUNNING, "ended": JobStatus.SUCCEEDED, "leftover": None}
    for job_id, status in cases.items():
        store.markers.add(active_key(OWNER, job_id))
        if status is not None:
            store.records[job_id] = record(job_id, status)
    assert await _active_jobs(store, OWNER, limit=4) == {"live", "running"}  # type: ignore[arg-type]
    assert sorted(job_id_of_active(k) for k in store.markers) == ["live", "running"]


async def test_below_the_limit_nothing_is_read() -> None:
    store = FakeStore()
    store.markers.add(active_key(OWNER, "gone"))
    assert await _active_jobs(store, OWNER, limit=2) == {"gone"}  # type: ignore[arg-type]
    assert store.markers


class PausedListing(FakeStore):
    """A listing that sees the markers as they were when it began and answers once released."""

    def __init__(self) -> None:
        super().__init__()
        self.listing = asyncio.Event()
        self.release = asyncio.Event()

    async def list_keys(self, prefix: str, start_after: str | None, limit: int) -> list[str]:
        seen = await super().list_keys(prefix, start_after, limit)
        self.listing.set()
        await self.release.wait()
        return seen

    async def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        self.markers.add(key)


class OneJobKeys:
    def quota(self, key: object) -> int:
        return 1


class FakeRequest(dict):
    def __init__(self, app: dict) -> None:
        super().__init__({OWNER_KEY: OWNER, API_KEY: "key"})
        self.app = app


async def test_a_job_accepted_while_a_listing_runs_stays_counted() -> None:
    """Job A is accepted (its marker written) after B's listing began: B must still count it."""
    store = PausedListing()
    store.release.set()
    app = {COUNTS: {}, KEYS: OneJobKeys(), STORE: store}
    first, second = FakeRequest(app), FakeRequest(app)
    a_inside, a_go = asyncio.Event(), asyncio.Event()

    async def submit_a() -> None:
        async with slot(first, "text-to-video"):  # the first listing finds nothing
            a_inside.set()
            await a_go.wait()
            await hold(first, "text-to-video", "job-a")

    a = asyncio.create_task(submit_a())
    await asyncio.wait_for(a_inside.wait(), 5)
    store.listing.clear()
    store.release.clear()

    async def submit_b() -> None:
        async with slot(second, "text-to-video"):
            pass

    b = asyncio.create_task(submit_b())  # at the limit with A in flight: B lists the markers
    await asyncio.wait_for(store.listing.wait(), 5)
    a_go.set()
    await asyncio.wait_for(a, 5)  # A accepted, its marker written after B's listing looked
    store.release.set()
    with pytest.raises(ApiError) as refused:
        await asyncio.wait_for(b, 5)
    assert refused.value.status == 429 and refused.value.code == "quota_exceeded"


class NoQuotaKeys:
    def quota(self, key: object) -> None:
        return None


async def test_a_key_without_a_quota_lists_and_writes_no_markers() -> None:
    """An `unlimited` key: however many jobs it has, no listing, no marker, no refusal."""
    store = PausedListing()  # a listing would wait here for ever: release is never set
    app = {COUNTS: {}, KEYS: NoQuotaKeys(), STORE: store}

    async def submit(n: int) -> None:
        async with slot(FakeRequest(app), "text-to-video"):
            await hold(FakeRequest(app), "text-to-video", f"job-{n}")

    for n in range(20):
        await asyncio.wait_for(submit(n), 5)
    assert store.markers == set() and not store.listing.is_set() and app[COUNTS] == {}


class Limit:
    def __init__(self, n: int) -> None:
        self.n = n

    def quota(self, key: object) -> int:
        return self.n


@asynccontextmanager
async def _in_flight(app: dict, job_id: str, marker: bool):
    """A submission that holds its slot (having written its job's marker, or not yet) meanwhile."""
    inside, go = asyncio.Event(), asyncio.Event()

    async def submission() -> None:
        request = FakeRequest(app)
        async with slot(request, "text-to-video"):
            if marker:
                await hold(request, "text-to-video", job_id)
            inside.set()
            await go.wait()

    task = asyncio.create_task(submission())
    await asyncio.wait_for(inside.wait(), 5)
    try:
        yield
    finally:
        go.set()
        await task


async def _submit(app: dict) -> None:
    async with slot(FakeRequest(app), "text-to-video"):
        pass


async def test_a_submission_in_flight_whose_marker_is_listed_counts_once() -> None:
    """Limit 3: job C accepted, A in flight with its marker written; a listing then sees both
    markers. B is the third job and fits (A was counted twice: as listed and as in flight)."""
    store = PausedListing()
    store.release.set()
    app = {COUNTS: {}, KEYS: Limit(3), STORE: store}
    c = FakeRequest(app)
    async with slot(c, "text-to-video"):
        await hold(c, "text-to-video", "job-c")
    store.records["job-c"] = record("job-c", JobStatus.RUNNING)
    store.records["job-a"] = record("job-a", JobStatus.QUEUED)
    async with _in_flight(app, "job-a", marker=True):
        app[COUNTS][OWNER].at -= 3  # the count is old: the next check lists the markers
        await _submit(app)
    assert app[COUNTS][OWNER].used() == 3  # C, A (once) and B


async def test_a_stale_marker_below_the_limit_is_swept_before_it_refuses_a_job() -> None:
    """Limit 2: one marker of a job that ended (its end was missed), and A in flight before its
    marker. Markers and A together reach the limit: the marker is checked, found stale, removed,
    and B fits."""
    store = PausedListing()
    store.release.set()
    store.markers.add(active_key(OWNER, "old"))
    store.records["old"] = record("old", JobStatus.SUCCEEDED)
    app = {COUNTS: {}, KEYS: Limit(2), STORE: store}
    async with _in_flight(app, "job-a", marker=False):
        await _submit(app)
    assert store.markers == set()
