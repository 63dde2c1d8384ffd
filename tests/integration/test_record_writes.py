"""Job records are written conditionally (S3 `If-Match`), against the real store: whoever writes
second over the same version loses and reads again, so the gateway's expiry and dead-letter
writes never overwrite a worker that took the job meanwhile. (The cancel's race is in
test_gateway_in_process.py, the worker's side in tests/unit/test_worker_handle.py.)"""

from __future__ import annotations

import pytest

from common.settings import CommonSettings
from common.store import ObjectStore, RecordChanged
from gateway.deadletters import dead_letter_handler, expiry_handler
from schemas.jobs import JobRecord, JobStatus, Phase
from schemas.messages import ExpiryCheck, JobMessage, new_id
from schemas.registry import load_registry
from tests.helpers import queued_record

pytestmark = pytest.mark.usefixtures("closed_stores")


def settings_of(s3_store) -> CommonSettings:
    return CommonSettings(
        s3_endpoint=s3_store.endpoint,
        s3_access_key=s3_store.access_key,
        s3_secret_key=s3_store.secret_key,
        s3_bucket=s3_store.bucket,
    )


def store_of(s3_store) -> ObjectStore:
    return ObjectStore(settings_of(s3_store))


def taken_by_a_worker(record: JobRecord) -> JobRecord:
    return record.advance(status=JobStatus.RUNNING, phase=Phase.LOADING, attempts=1, worker="worker-x")


class RacedStore(ObjectStore):
    """A worker writes the job once, just after the first time the gateway reads it."""

    def __init__(self, s3_store, race) -> None:
        super().__init__(settings_of(s3_store))
        self.race, self.raced = race, False

    async def get_record_tagged(self, job_id: str):
        found = await super().get_record_tagged(job_id)
        if found is not None and not self.raced:
            self.raced = True
            await self.put_record(self.race(found[0]))
        return found


class Broker:
    def __init__(self) -> None:
        self.events, self.cancels, self.dropped, self.checks = [], [], [], []

    async def publish_check(self, check, delay_s: float) -> None:
        self.checks.append((check, delay_s))

    async def publish_end(self, event) -> None:
        self.events.append(event)

    async def publish_dropped(self, message) -> None:
        self.dropped.append(message.job_id)

    async def publish_cancel(self, job_id: str) -> None:
        self.cancels.append(job_id)


async def test_a_write_over_a_version_no_longer_stored_is_refused(s3_store) -> None:
    store = store_of(s3_store)
    record = queued_record(new_id())
    first = await store.replace_record(record, None)  # None: only where there is no record yet
    with pytest.raises(RecordChanged):
        await store.replace_record(record.advance(message="again"), None)
    running = taken_by_a_worker(record)
    assert await store.replace_record(running, first) != first
    with pytest.raises(RecordChanged):
        await store.replace_record(record.advance(status=JobStatus.CANCELLED, phase=Phase.CANCELLED), first)
    assert (await store.get_record(record.job_id)) == running


async def test_a_write_retried_after_its_answer_was_lost_counts_as_done(s3_store) -> None:
    store = store_of(s3_store)
    record = queued_record(new_id())
    etag = await store.replace_record(record, None)
    running = taken_by_a_worker(record)
    written = await store.replace_record(running, etag)
    assert await store.replace_record(running, etag) == written  # the same bytes are already there
    assert (await store.get_record_tagged(record.job_id)) == (running, written)


async def test_expiry_leaves_a_job_a_worker_took_meanwhile_to_run(s3_store) -> None:
    store, broker = RacedStore(s3_store, taken_by_a_worker), Broker()
    record = queued_record(new_id())
    await store.put_record(record)
    await expiry_handler(store, broker)(ExpiryCheck(job_id=record.job_id, model="ltx-tiny", max_queue_s=1))
    now = await store.get_record(record.job_id)
    assert store.raced and now.status == JobStatus.RUNNING and now.worker == "worker-x"
    assert broker.events == [] and broker.cancels == []


async def test_expiry_still_fails_a_job_nobody_took(s3_store) -> None:
    store, broker = store_of(s3_store), Broker()
    record = queued_record(new_id())
    await store.put_record(record)
    await expiry_handler(store, broker)(ExpiryCheck(job_id=record.job_id, model="ltx-tiny", max_queue_s=1))
    now = await store.get_record(record.job_id)
    assert now.status == JobStatus.FAILED and now.error.code == "expired" and now.seq == 1
    assert [e.status for e in broker.events] == [JobStatus.FAILED] and broker.cancels == [record.job_id]


async def test_a_check_with_time_left_goes_round_again_for_it(s3_store) -> None:
    """A check waits in the longest delay queue that fits its job's limit (3600 s: 2048 s, with
    1552 s left), and when it falls due with time left the gateway publishes it again for that
    time, leaving a queued job as it is; with none left, it ends the job."""
    store, broker = store_of(s3_store), Broker()
    record = queued_record(new_id())
    await store.put_record(record)
    check = ExpiryCheck(job_id=record.job_id, model="ltx-tiny", max_queue_s=3600, left_s=1552)
    await expiry_handler(store, broker)(check)
    assert (await store.get_record(record.job_id)) == record, "still queued, unchanged"
    assert broker.checks == [(check, 1552)] and broker.events == [] and broker.cancels == []
    await expiry_handler(store, broker)(check.model_copy(update={"left_s": 0}))
    assert (await store.get_record(record.job_id)).error.code == "expired"
    # A job that started meanwhile stops its check at once, whatever time it had left.
    started = taken_by_a_worker(queued_record(new_id()))
    await store.put_record(started)
    await expiry_handler(store, broker)(check.model_copy(update={"job_id": started.job_id}))
    assert len(broker.checks) == 1 and (await store.get_record(started.job_id)) == started


async def test_a_dead_letter_does_not_overwrite_a_job_that_ended_meanwhile(s3_store) -> None:
    def succeeded(record: JobRecord) -> JobRecord:
        return taken_by_a_worker(record).advance(status=JobStatus.SUCCEEDED, phase=Phase.SUCCEEDED, progress=1.0)

    store, broker = RacedStore(s3_store, succeeded), Broker()
    record = taken_by_a_worker(queued_record(new_id()))
    await store.put_record(record)
    job = JobMessage(job_id=record.job_id, mode="text-to-video", params=record.params)
    await dead_letter_handler(store, broker, load_registry())(job, "delivery_limit", {})
    assert store.raced and (await store.get_record(record.job_id)).status == JobStatus.SUCCEEDED
    assert broker.events == []


class FailingOnceBroker(Broker):
    """Its first publish of an event fails, as when the broker connection drops."""

    async def publish_end(self, event) -> None:
        if not self.events and not getattr(self, "failed", False):
            self.failed = True
            raise ConnectionError("broker connection lost")
        await super().publish_end(event)


async def test_an_expiry_whose_event_was_not_sent_sends_it_when_the_check_comes_again(s3_store) -> None:
    store, broker = store_of(s3_store), FailingOnceBroker()
    record = queued_record(new_id())
    await store.put_record(record)
    check = ExpiryCheck(job_id=record.job_id, model="ltx-tiny", max_queue_s=1)
    with pytest.raises(ConnectionError):  # handled again, after a pause
        await expiry_handler(store, broker)(check)
    await expiry_handler(store, broker)(check)
    now = await store.get_record(record.job_id)
    assert now.status == JobStatus.FAILED and now.seq == 1, "written once"
    assert [e.seq for e in broker.events] == [1] and broker.cancels == [record.job_id]


async def test_a_dead_letter_whose_event_was_not_sent_sends_it_when_it_comes_again(s3_store) -> None:
    store, broker = store_of(s3_store), FailingOnceBroker()
    record = taken_by_a_worker(queued_record(new_id()))
    await store.put_record(record)
    job = JobMessage(job_id=record.job_id, mode="text-to-video", params=record.params)
    handle = dead_letter_handler(store, broker, load_registry())
    with pytest.raises(ConnectionError):
        await handle(job, "delivery_limit", {})
    await handle(job, "delivery_limit", {})
    now = await store.get_record(record.job_id)
    assert now.status == JobStatus.FAILED and now.error.code == "worker_crashed" and now.seq == record.seq + 1
    assert [e.status for e in broker.events] == [JobStatus.FAILED]
    assert set(broker.dropped) == {record.job_id}  # its message left the queue: gateways stop counting it
