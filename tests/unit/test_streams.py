"""A job stream's frames: history after `since`, then live events, and its end."""

from __future__ import annotations

import asyncio

import pytest

from common.settings import GatewaySettings
from gateway.events import EventHub
from gateway.keys import SETTINGS, STORE
from gateway.streams import JobStream, StreamRequest, _Quiet, pump
from schemas.jobs import JobStatus, Phase
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
