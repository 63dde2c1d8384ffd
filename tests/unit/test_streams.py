"""A job stream's frames: history after `since`, then live events, and its end."""

from __future__ import annotations

import asyncio

import pytest

from common.settings import GatewaySettings
from gateway.events import EventHub
from gateway.keys import SETTINGS, STORE
from gateway.streams import JobStream, StreamRequest, pump
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
