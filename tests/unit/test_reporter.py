from __future__ import annotations

import asyncio
import threading

import pytest

from common.store import RecordChanged
from schemas.errors import worker_crashed
from schemas.jobs import JobRecord, JobStatus, Phase, utcnow
from tests.helpers import FakeRecords, queued_record
from worker.reporter import DeliveryLost, EndedElsewhere, JobReporter


class FakeStore(FakeRecords):
    """Keeps every record written, in order; can be made to fail."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[JobRecord] = []
        self.fail = False
        self.fail_after_s = 0.0  # how long a failing write takes (retries, timeouts)
        self.attempts = 0

    async def replace_record(self, record: JobRecord, etag: str | None) -> str:
        self.attempts += 1
        if self.fail:
            await asyncio.sleep(self.fail_after_s)
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


async def test_while_the_store_fails_progress_updates_join_the_one_waiting(published) -> None:
    """Steps come faster than failing writes end: instead of a write queued per step (and the
    job's end waiting for all of them), the changes join the update waiting for its turn, and the
    first write after the outage carries the latest step."""
    store = FakeStore()

    async def publish(event):
        published.append(event)

    reporter = JobReporter(queued_record(), None, store, publish)
    await reporter.update(status=JobStatus.RUNNING, phase=Phase.LOADING)
    store.fail, store.fail_after_s, before = True, 0.05, store.attempts
    for step in range(1, 41):
        reporter.update_threadsafe(phase=Phase.DENOISING, step=step, total_steps=40, progress=0.9 * step / 40)
        await asyncio.sleep(0.005)
    store.fail = False
    await reporter.flush()
    assert store.attempts - before < 25, store.attempts - before  # one per step: 40
    assert reporter.record.step == 40 and published[-1].step == 40
    assert [e.seq for e in published] == list(range(1, len(published) + 1))


async def started(store: FakeStore, published: list, lost=lambda: False, **options) -> JobReporter:
    """A reporter whose run has written `running` over the gateway's queued record."""
    queued = queued_record()
    await store.put_record(queued)

    async def publish(event):
        published.append(event)

    reporter = JobReporter(queued, store.etag(queued), store, publish, lost=lost, **options)
    await reporter.update(status=JobStatus.RUNNING, phase=Phase.LOADING, attempts=1, worker="worker-a")
    return reporter


@pytest.mark.parametrize("failed_after", [0, 2])
async def test_a_progress_write_the_store_took_though_its_answer_was_lost_is_built_on(published, failed_after) -> None:
    """Progress write 1 lands but its answer is lost, and `failed_after` more fail outright (the
    store is down): the next write finds write 1 stored and goes on from it, not taking it for
    somebody else's change."""
    store = FakeStore()
    reporter = await started(store, published)
    replace = store.replace_record

    async def answer_lost(record, etag):
        await replace(record, etag)
        raise ConnectionError("read timed out")

    store.replace_record = answer_lost
    with pytest.raises(ConnectionError):
        await reporter.update(patient=False, phase=Phase.DENOISING, step=1)
    store.fail = True
    for step in range(2, 2 + failed_after):
        with pytest.raises(ConnectionError):
            await reporter.update(patient=False, phase=Phase.DENOISING, step=step)
    store.fail = False
    store.replace_record = replace
    await reporter.update(phase=Phase.DENOISING, step=9)  # not refused as somebody else's change
    assert [r.step for r in store.written] == [None, 1, 9] and store.records["j"].seq == 3
    assert reporter.record == store.records["j"] and [e.seq for e in published] == [1, 3]


async def test_a_run_another_worker_took_over_stops_as_a_lost_delivery(published) -> None:
    """The broker handed the job to another worker before this one noticed that its delivery was
    lost: the first write that finds the other run's attempt stops this run."""
    store, told = FakeStore(), []
    reporter = await started(store, published, on_taken_over=lambda: told.append(1))
    store.records["j"] = store.records["j"].advance(attempts=2, worker="worker-b")
    with pytest.raises(DeliveryLost):
        await reporter.update(status=JobStatus.SUCCEEDED, phase=Phase.SUCCEEDED)
    assert told == [1] and store.records["j"].worker == "worker-b"


async def test_a_job_ended_by_the_gateway_meanwhile_stops_the_run_without_a_write(published) -> None:
    store = FakeStore()
    queued = queued_record()
    await store.put_record(queued)

    async def publish(event):
        published.append(event)

    reporter = JobReporter(queued, store.etag(queued), store, publish)
    cancelled = queued.advance(status=JobStatus.CANCELLED, phase=Phase.CANCELLED)
    await store.put_record(cancelled)  # the gateway's cancel, between the run's read and its first write
    with pytest.raises(EndedElsewhere) as ended:
        await reporter.update(status=JobStatus.RUNNING, phase=Phase.LOADING, attempts=1, worker="worker-a")
    assert ended.value.record == cancelled and store.records["j"] == cancelled and published == []


async def test_after_a_lost_delivery_only_an_end_over_this_runs_own_record_is_written(published) -> None:
    store, lost = FakeStore(), threading.Event()
    reporter = await started(store, published, lost=lost.is_set)
    lost.set()
    with pytest.raises(DeliveryLost):  # no more progress
        await reporter.update(phase=Phase.DENOISING, step=1)
    mine = store.records["j"]
    store.records["j"] = mine.advance(attempts=2, worker="worker-b")  # another worker took it over
    with pytest.raises(DeliveryLost):
        await reporter.update(status=JobStatus.SUCCEEDED, phase=Phase.SUCCEEDED)
    assert store.records["j"].worker == "worker-b"
    store.records["j"] = mine  # nobody took it over: this run's end is written
    await reporter.update(status=JobStatus.SUCCEEDED, phase=Phase.SUCCEEDED)
    assert store.records["j"].status == JobStatus.SUCCEEDED and store.records["j"].worker == "worker-a"


async def test_a_job_the_gateway_failed_while_it_ran_is_not_taken_for_this_runs_own_write(published) -> None:
    """The dead-letter handler ends a running record as it is (same worker and attempt, next seq)."""
    store = FakeStore()
    reporter = await started(store, published)
    failed = store.records["j"].advance(status=JobStatus.FAILED, phase=Phase.FAILED, error=worker_crashed())
    store.records["j"] = failed
    with pytest.raises(EndedElsewhere):
        await reporter.update(phase=Phase.DENOISING, step=1)
    assert store.records["j"] == failed


async def test_a_cancel_the_gateway_marked_on_the_record_is_kept_and_stops_the_run(published) -> None:
    """The gateway marks a running job's record with the cancel (as when the broadcast could not
    be sent); the run's next write finds the mark, keeps it, and tells the worker to stop."""
    store, told = FakeStore(), []
    reporter = await started(store, published)
    reporter._on_cancel_requested = lambda: told.append(1)
    marked = store.records["j"].model_copy(update={"cancel_requested_at": utcnow()})
    store.records["j"] = marked
    await reporter.update(phase=Phase.DENOISING, step=1)
    assert told == [1] and store.records["j"].step == 1
    assert store.records["j"].cancel_requested_at == marked.cancel_requested_at
    await reporter.update(status=JobStatus.CANCELLED, phase=Phase.CANCELLED)
    assert store.records["j"].cancel_requested_at == marked.cancel_requested_at and told == [1]


async def test_any_other_change_by_somebody_else_is_still_refused(published) -> None:
    store = FakeStore()
    reporter = await started(store, published)
    store.records["j"] = store.records["j"].model_copy(
        update={"cancel_requested_at": utcnow(), "message": "somebody else's change"}
    )
    with pytest.raises(RecordChanged):
        await reporter.update(phase=Phase.DENOISING, step=1)


async def test_the_end_of_a_job_is_published_through_a_short_broker_outage(published) -> None:
    """The end is in the record: a delivery of the job that finds it ended publishes nothing, so
    the reporter itself tries the end's event again (progress events are not worth it)."""
    store, failures = FakeStore(), []
    queued = queued_record()
    await store.put_record(queued)

    async def publish(event):
        if event.status.is_terminal and len(failures) < 2:
            failures.append(event.seq)
            raise ConnectionError("broker connection lost")
        published.append(event)

    reporter = JobReporter(queued, store.etag(queued), store, publish, store_patience_s=5.0)
    await reporter.update(status=JobStatus.RUNNING, phase=Phase.LOADING, attempts=1, worker="worker-a")
    await reporter.update(status=JobStatus.SUCCEEDED, phase=Phase.SUCCEEDED, progress=1.0)
    assert failures == [2, 2] and [e.status for e in published] == [JobStatus.RUNNING, JobStatus.SUCCEEDED]
