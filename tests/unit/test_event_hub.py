from __future__ import annotations

from gateway.events import EventHub
from schemas.jobs import JobStatus, Phase
from schemas.messages import JobEvent


def event(job_id: str, seq: int) -> JobEvent:
    return JobEvent(job_id=job_id, seq=seq, status=JobStatus.RUNNING, phase=Phase.DENOISING, progress=0.1)


def drain(sub) -> list[tuple[str, int]]:
    out = []
    while not sub.queue.empty():
        e = sub.queue.get_nowait()
        out.append((e.job_id, e.seq))
    return out


def test_subscribers_get_only_their_jobs_and_all_get_everything() -> None:
    hub = EventHub()
    with hub.subscribe(["a", "b"]) as ab, hub.subscribe(["b"]) as b, hub.subscribe(None) as every:
        for job, seq in (("a", 0), ("b", 0), ("c", 0), ("a", 1)):
            hub.publish(event(job, seq))
        assert drain(ab) == [("a", 0), ("b", 0), ("a", 1)]
        assert drain(b) == [("b", 0)]
        assert drain(every) == [("a", 0), ("b", 0), ("c", 0), ("a", 1)]
        assert hub.subscriber_count == 3
    assert hub.subscriber_count == 0
    hub.publish(event("a", 2))  # nobody listening: nothing kept


def test_close_all_wakes_subscribers() -> None:
    hub = EventHub()
    with hub.subscribe(["a"]) as one, hub.subscribe(None) as every:
        hub.close_all()
        assert one.queue.get_nowait() is None and every.queue.get_nowait() is None


def test_a_subscriber_that_falls_too_far_behind_is_cut_off_not_buffered(monkeypatch) -> None:
    monkeypatch.setattr("gateway.events.SUBSCRIBER_BACKLOG", 3)
    hub = EventHub()
    with hub.subscribe(None) as stalled, hub.subscribe(["b"]) as other:
        for seq in range(10):
            hub.publish(event("a", seq))
        hub.publish(event("b", 0))
        assert stalled.overflowed and stalled.queue.qsize() == 3, "at most the backlog is kept"
        assert not other.overflowed and drain(other) == [("b", 0)]
        hub.close_all()  # a full queue does not stop the shutdown
