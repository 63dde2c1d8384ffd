"""The quota's check at the limit, against a fake store that behaves like the real one."""

from __future__ import annotations

from common.store import active_key, job_id_of_active
from gateway.quota import _active_jobs
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
    assert await _active_jobs(store, OWNER, limit=4) == 2  # type: ignore[arg-type]
    assert sorted(job_id_of_active(k) for k in store.markers) == ["live", "running"]


async def test_below_the_limit_nothing_is_read() -> None:
    store = FakeStore()
    store.markers.add(active_key(OWNER, "gone"))
    assert await _active_jobs(store, OWNER, limit=2) == 1  # type: ignore[arg-type]
    assert store.markers
