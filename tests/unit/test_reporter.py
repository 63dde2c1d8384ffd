from __future__ import annotations

import asyncio
import threading

import pytest

from schemas.jobs import JobRecord, JobStatus, Phase
from tests.helpers import FakeRecords, queued_record
from worker.reporter import JobReporter


class FakeStore(FakeRecords):
    """Keeps every record written, in order; can be made to fail."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[JobRecord] = []
        self.fail = False

    async def replace_record(self, record: JobRecord, etag: str | None) -> str:
        if self.fail:
            raise ConnectionError("store down")
        etag = await super().replace_record(record, etag)
        self.written.append(record)
        return etag


@pytest.fixture
def published():
    return []


async def test_each_update_is_written_then_published_in_order(published) -> None:
    store = FakeStore()

    async def publish(event):
        assert store.written[-1].seq == event.seq, "the record is written before the event goes out"
        published.append(event)

    reporter = JobReporter(queued_record(), None, store, publish)
    await reporter.update(status=JobStatus.RUNNING, phase=Phase.LOADING)

    def gpu_thread() -> None:
        for step in (1, 2, 3, 4):
            reporter.update_threadsafe(phase=Phase.DENOISING, step=step, progress=step / 5)

    thread = threading.Thread(target=gpu_thread)
    thread.start()
    await asyncio.to_thread(thread.join)
    await reporter.flush()
    await reporter.update(phase=Phase.ENCODING, progress=0.1)  # lower progress is ignored

    assert [e.seq for e in published] == [1, 2, 3, 4, 5, 6]
    assert [e.step for e in published[1:5]] == [1, 2, 3, 4]
    assert published[-1].progress == pytest.approx(0.8)
    assert reporter.record.seq == 6 and store.written[-1] == reporter.record


async def test_failed_write_raises_and_publishes_nothing(published) -> None:
    store = FakeStore()

    async def publish(event):
        published.append(event)

    reporter = JobReporter(queued_record(), None, store, publish)
    store.fail = True
    with pytest.raises(ConnectionError):
        await reporter.update(status=JobStatus.RUNNING, phase=Phase.LOADING)
    assert published == [] and reporter.record.seq == 0
    reporter.update_threadsafe(phase=Phase.DENOISING, step=1)  # best effort: logged, not raised
    await asyncio.sleep(0)
    await reporter.flush()
    assert published == []
