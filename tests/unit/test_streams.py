"""A job stream's frames: history after `since`, then live events, and its end."""

from __future__ import annotations

import asyncio

import pytest

from common.settings import GatewaySettings
from gateway.events import EventHub
from gateway.keys import SETTINGS, STORE
from gateway.streams import JobStream, StreamRequest, _Quiet, pump
from schemas.jobs import JobRecord, JobStatus, Phase
from schemas.messages import JobEvent
from tests.helpers import FakeRecords, queued_record

JOB = "3c1e0b7a-9d2f-4e6a-8b5c-1f2e3d4c5b6a"


async def frames_until_the_end(since: int) -> list[int]:
    """Follow a queued job (seq 0) resumed after `since`; it is then cancelled (seq 1)."""
    record = queued_record(JOB)
    record.events = [record.last_event()]
    app = {STORE: None, SETTINGS: GatewaySettings()}
    hub = EventHub()
    with hub.subscribe([JOB]) as sub:
        stream = JobStream(app, StreamRequest([JOB], since), {JOB: record}, sub)  # type: ignore[arg-type]

        async def collect() -> list[int]:
            return [frame["seq"] async for frame in stream.frames()]

        following = asyncio.ensure_future(collect())
        await asyncio.sleep(0)  # the history is sent; the stream waits for live events
        ended = record.advance(status=JobStatus.CANCELLED, phase=Phase.CANCELLED)
        hub.publish(JobEvent.from_record(ended))
        return await asyncio.wait_for(following, 5)


@pytest.mark.parametrize(("since", "seqs"), [(-1, [0, 1]), (0, [1]), (5, [])])
async def test_a_stream_ends_on_its_jobs_terminal_event_whatever_its_since(since: int, seqs: list[int]) -> None:
    """Even resumed past every event the job has (a stale or wrong `since`), the stream ends once
    the job has ended, instead of waiting for ever."""
    assert await frames_until_the_end(since) == seqs


async def test_a_stream_whose_client_fell_too_far_behind_ends_for_it_to_resume(monkeypatch) -> None:
    monkeypatch.setattr("gateway.events.SUBSCRIBER_BACKLOG", 2)
    record = queued_record(JOB)
    record.events = [record.last_event()]
    hub = EventHub()
    with hub.subscribe([JOB]) as sub:
        stream = JobStream({STORE: None, SETTINGS: GatewaySettings()}, StreamRequest([JOB], -1), {JOB: record}, sub)  # type: ignore[arg-type]
        running = record
        for _ in range(3):  # more than the backlog while the client reads nothing
            running = running.advance(status=JobStatus.RUNNING, phase=Phase.LOADING)
            hub.publish(JobEvent.from_record(running))
        seqs = await asyncio.wait_for(_collect(stream), 5)
    assert seqs == [0] and stream.overflowed, "the history, then the end: the client resumes with since=0"


async def _collect(stream: JobStream) -> list[int]:
    return [frame["seq"] async for frame in stream.frames()]


async def test_a_client_that_takes_no_data_ends_its_stream(monkeypatch) -> None:
    monkeypatch.setattr("gateway.streams.SEND_TIMEOUT_S", 0.05)

    async def frames():
        while True:
            yield {"seq": 0}

    async def never_sent(frame) -> None:
        await asyncio.Event().wait()

    gone = asyncio.get_running_loop().create_future()
    await asyncio.wait_for(pump(frames(), never_sent, gone), 5)


async def test_a_stream_whose_live_events_were_lost_catches_up_from_the_record(monkeypatch) -> None:
    """The job's next events never arrive live (published without a confirm as the broker went
    away): after RECHECK_S without an event the stream reads the record, sends what it missed,
    and ends with the job."""
    monkeypatch.setattr("gateway.streams.RECHECK_S", 0.05)
    store = FakeRecords()
    record = queued_record(JOB)
    record.events = [record.last_event()]
    running = record.advance(status=JobStatus.RUNNING, phase=Phase.LOADING)
    store.records[JOB] = running.advance(status=JobStatus.CANCELLED, phase=Phase.CANCELLED)
    hub = EventHub()
    with hub.subscribe([JOB]) as sub:
        stream = JobStream({STORE: store, SETTINGS: GatewaySettings()}, StreamRequest([JOB], -1), {JOB: record}, sub)  # type: ignore[arg-type]
        hub.publish(JobEvent.from_record(running))  # this one arrives
        assert await asyncio.wait_for(_collect(stream), 5) == [0, 1, 2]


async def test_a_live_event_that_skips_a_seq_is_preceded_by_the_ones_between(monkeypatch) -> None:
    """seq 1 never arrived live; seq 2 does: the stream reads the record and sends 1 before 2."""
    store = FakeRecords()
    record = queued_record(JOB)
    record.events = [record.last_event()]
    loading = record.advance(status=JobStatus.RUNNING, phase=Phase.LOADING)
    denoising = loading.advance(phase=Phase.DENOISING, step=1)
    store.records[JOB] = denoising
    hub = EventHub()
    with hub.subscribe([JOB]) as sub:
        stream = JobStream({STORE: store, SETTINGS: GatewaySettings()}, StreamRequest([JOB], -1), {JOB: record}, sub)  # type: ignore[arg-type]
        hub.publish(JobEvent.from_record(denoising))
        ended = denoising.advance(status=JobStatus.CANCELLED, phase=Phase.CANCELLED)
        hub.publish(JobEvent.from_record(ended))
        assert await asyncio.wait_for(_collect(stream), 5) == [0, 1, 2, 3]


async def test_a_quiet_job_is_read_again_while_another_job_of_the_stream_is_busy(monkeypatch) -> None:
    """B's end was lost live; A sends events far more often than the recheck pause: B is still
    read again on time, and the stream ends when both have."""
    monkeypatch.setattr("gateway.streams.RECHECK_S", 0.1)
    other = "5d2e1c0b-8a9f-4b7e-9c6d-2a3b4c5d6e7f"
    store = FakeRecords()
    busy, quiet = queued_record(JOB), queued_record(other)
    for r in (busy, quiet):
        r.events = [r.last_event()]
    store.records[other] = quiet.advance(status=JobStatus.CANCELLED, phase=Phase.CANCELLED)
    hub = EventHub()
    with hub.subscribe([JOB, other]) as sub:
        request = StreamRequest([JOB, other], -1)
        stream = JobStream({STORE: store, SETTINGS: GatewaySettings()}, request, {JOB: busy, other: quiet}, sub)  # type: ignore[arg-type]
        following = asyncio.ensure_future(_collect_jobs(stream))
        step = busy.advance(status=JobStatus.RUNNING, phase=Phase.LOADING)
        while not following.done() and step.seq < 200:
            hub.publish(JobEvent.from_record(step))
            await asyncio.sleep(0.01)  # one event every 10 ms, the recheck pause is 100 ms
            if (other, 1) in stream_sent(stream):
                break
            step = step.advance(phase=Phase.DENOISING, step=step.seq)
        assert (other, 1) in stream_sent(stream), "the quiet job's end was read again while the other was busy"
        hub.publish(JobEvent.from_record(step.advance(status=JobStatus.CANCELLED, phase=Phase.CANCELLED)))
        await asyncio.wait_for(following, 5)


def stream_sent(stream: JobStream) -> set[tuple[str, int]]:
    return set(stream._last.items())


async def _collect_jobs(stream: JobStream) -> list[tuple[str, int]]:
    return [(frame["job_id"], frame["seq"]) async for frame in stream.frames()]


def test_a_quiet_job_is_read_less_often_the_longer_it_stays_quiet() -> None:
    timer = _Quiet(0.0)
    dues = []
    for _ in range(5):
        dues.append(timer.due)
        timer.checked(timer.due, found=False)
    assert dues == [10.0, 30.0, 70.0, 130.0, 190.0]  # 10 s, then 20, 40, 60 at most
    timer.checked(200.0, found=True)
    assert timer.due == 210.0
    timer.heard(205.0)
    assert timer.due == 215.0


class FlakyRecords(FakeRecords):
    """A store whose reads fail while `down`."""

    def __init__(self, read_s: float = 0.0) -> None:
        super().__init__()
        self.down = False
        self.read_s = read_s

    async def get_record(self, job_id):
        await asyncio.sleep(self.read_s)
        if self.down:
            raise OSError("store unreachable")
        return self.records.get(job_id)


async def test_a_gap_the_store_cannot_fill_ends_the_stream_for_the_client_to_resume() -> None:
    """seq 1 is lost live, and seq 2 comes while the record cannot be read: sending 2 would leave
    the gap for good, so the stream ends (the WebSocket with 1013) after 0, and a resumed stream
    sends 1, 2 and the rest."""
    from gateway.streams import Ended

    store = FlakyRecords()
    record = queued_record(JOB)
    record.events = [record.last_event()]
    loading = record.advance(status=JobStatus.RUNNING, phase=Phase.LOADING)  # seq 1: lost live
    denoising = loading.advance(phase=Phase.DENOISING, step=1)  # seq 2
    store.records[JOB] = denoising
    hub = EventHub()
    settings = GatewaySettings()
    with hub.subscribe([JOB]) as sub:
        stream = JobStream({STORE: store, SETTINGS: settings}, StreamRequest([JOB], -1), {JOB: record}, sub)  # type: ignore[arg-type]
        store.down = True
        hub.publish(JobEvent.from_record(denoising))
        assert await asyncio.wait_for(_collect(stream), 5) == [0]
        assert stream.ended == Ended.GAP
    store.down = False
    with hub.subscribe([JOB]) as sub:
        resumed = JobStream({STORE: store, SETTINGS: settings}, StreamRequest([JOB], 0), {JOB: denoising}, sub)  # type: ignore[arg-type]
        hub.publish(JobEvent.from_record(denoising.advance(status=JobStatus.CANCELLED, phase=Phase.CANCELLED)))
        assert await asyncio.wait_for(_collect(resumed), 5) == [1, 2, 3]
        assert resumed.ended == Ended.DONE


async def test_quiet_jobs_are_read_again_at_once_not_one_by_one(monkeypatch) -> None:
    """20 quiet jobs read again while a busy one sends: its live event does not wait for 20 reads
    in a row (4 s at 0.2 s a read)."""
    import time

    monkeypatch.setattr("gateway.streams.RECHECK_S", 0.2)
    store = FlakyRecords(read_s=0.2)
    jobs = [f"{n:08d}-9d2f-4e6a-8b5c-1f2e3d4c5b6a" for n in range(20)]
    records = {}
    for job_id in jobs:
        record = queued_record(job_id)
        record.events = [record.last_event()]
        records[job_id] = store.records[job_id] = record
    hub = EventHub()
    with hub.subscribe(jobs) as sub:
        stream = JobStream({STORE: store, SETTINGS: GatewaySettings()}, StreamRequest(jobs, -1), records, sub)  # type: ignore[arg-type]
        frames = stream.frames()
        for _ in jobs:  # the history
            await frames.__anext__()
        running = records[jobs[0]].advance(status=JobStatus.RUNNING, phase=Phase.LOADING)
        store.records[jobs[0]] = running
        waiting = asyncio.ensure_future(frames.__anext__())
        await asyncio.sleep(0.45)  # the reads of the quiet jobs are under way
        published = time.monotonic()
        hub.publish(JobEvent.from_record(running))
        frame = await asyncio.wait_for(waiting, 10)
        delay = time.monotonic() - published
        await frames.aclose()
    assert (frame["job_id"], frame["seq"]) == (jobs[0], 1)
    assert delay < 2.0, f"a live event waited {delay:.2f} s behind the quiet jobs' reads"


async def test_an_all_jobs_stream_remembers_a_bounded_number_of_jobs(monkeypatch) -> None:
    monkeypatch.setattr("gateway.streams.ALL_JOBS_MEMORY", 100)
    hub = EventHub()
    with hub.subscribe(None) as sub:
        stream = JobStream({STORE: FakeRecords(), SETTINGS: GatewaySettings()}, StreamRequest(None), {}, sub)  # type: ignore[arg-type]
        frames = stream.frames()
        for n in range(300):
            record = queued_record(f"{n:08d}-9d2f-4e6a-8b5c-1f2e3d4c5b6a")
            hub.publish(JobEvent.from_record(record.advance(status=JobStatus.CANCELLED, phase=Phase.CANCELLED)))
            await frames.__anext__()
        await frames.aclose()
    assert len(stream._last) == 100 and next(reversed(stream._last)).startswith("00000299")


async def test_a_cancel_that_meets_a_duplicate_event_still_stops_the_stream() -> None:
    """The client goes away as the broker's copy of an event already sent arrives: the stream stops
    (on Python 3.11, `wait_for` around the queue's get could return the event and drop the cancel,
    and the stream would wait for the job's next event, possibly hours)."""
    hub = EventHub()
    with hub.subscribe([JOB]) as sub:
        stream, record = _a_queued_jobs_stream(sub)
        frames = stream.frames()
        assert (await frames.__anext__())["seq"] == 0
        step = asyncio.ensure_future(frames.__anext__())
        await asyncio.sleep(0)  # the stream waits for live events
        hub.publish(JobEvent.from_record(record))  # the copy of seq 0 ...
        step.cancel()  # ... as the client goes away
        done, _ = await asyncio.wait({step}, timeout=2)
        assert done, "the cancelled stream kept waiting for the job's next event"


async def test_a_cancelled_pump_ends_cancelled_and_leaves_no_task() -> None:
    """The task sending a stream is cancelled (the gateway's shutdown timeout): it ends with
    CancelledError, not RuntimeError from closing a generator still running, and leaves nothing."""
    hub = EventHub()
    with hub.subscribe(None) as sub:
        stream = JobStream({STORE: FakeRecords(), SETTINGS: GatewaySettings()}, StreamRequest(None), {}, sub)  # type: ignore[arg-type]

        async def send(frame) -> None:
            pass

        before = asyncio.all_tasks()
        task = asyncio.ensure_future(pump(stream.frames(), send, asyncio.get_running_loop().create_future()))
        await asyncio.sleep(0.01)
        task.cancel()
        outcome = (await asyncio.gather(task, return_exceptions=True))[0]
        left = {t for t in asyncio.all_tasks() - before if not t.done()}
    assert isinstance(outcome, asyncio.CancelledError), repr(outcome)
    assert not left, left


async def test_a_stream_ended_by_the_gateway_stopping_says_so() -> None:
    from gateway.streams import Ended
    from gateway.ws import CLOSE

    hub = EventHub()
    with hub.subscribe([JOB]) as sub:
        stream, record = _a_queued_jobs_stream(sub)
        hub.close_all()
        assert await asyncio.wait_for(_collect(stream), 5) == [0]
    assert stream.ended == Ended.SHUTDOWN and CLOSE[stream.ended][0] == 1001


def _a_queued_jobs_stream(sub) -> tuple[JobStream, JobRecord]:
    record = queued_record(JOB)
    record.events = [record.last_event()]
    settings = GatewaySettings()
    return JobStream({STORE: FakeRecords(), SETTINGS: settings}, StreamRequest([JOB], -1), {JOB: record}, sub), record  # type: ignore[arg-type]


def test_the_resume_forms_the_docs_name_for_a_stream_of_one_job() -> None:
    """A Last-Event-ID without a `:` is the seq alone, a `seqs:` one with one position works too,
    and a job_id given twice counts once (docs/API.md, the streams)."""
    from aiohttp.test_utils import make_mocked_request

    job = "33e8a532-5095-4c26-82cb-3ee7a8c59e49"

    def parsed(query: str, last_event_id: str | None) -> StreamRequest:
        return StreamRequest.parse(make_mocked_request("GET", f"/api/v1/events?{query}"), last_event_id)

    assert parsed(f"job_id={job}", "9").since_of(job) == 9
    assert parsed(f"job_id={job}", f"{job}:9").since_of(job) == 9
    assert parsed(f"job_id={job}", "seqs:5").since_of(job) == 5
    twice = parsed(f"job_id={job}&job_id={job}&since=1", None)
    assert twice.job_ids == [job] and twice.since_of(job) == 1
