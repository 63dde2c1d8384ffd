from __future__ import annotations

from gateway.events import EventHub
from schemas.jobs import JobStatus, Phase
from schemas.messages import JobEvent


def event(job_id: str, seq: int) -> JobEvent:
    return JobEvent(job_id=job_id, seq=seq, status=JobStatus.RUNNING, phase=Phase.DENOISING, progress=0.1)


def test_backlog_then_live_without_gap_or_duplicate() -> None:
    hub = EventHub(max_jobs=10)
    hub.publish(event("a", 0))
    hub.publish(event("a", 1))
    hub.publish(event("a", 0))  # the broker's copy of the gateway's own event
    hub.publish(event("b", 0))
    with hub.subscribe("a") as sub:
        assert [e.seq for e in sub.backlog] == [0, 1]
        hub.publish(event("a", 2))
        hub.publish(event("b", 1))
        assert sub.queue.qsize() == 1 and sub.queue.get_nowait().seq == 2
    assert hub.subscriber_count == 0


def test_oldest_jobs_are_forgotten() -> None:
    hub = EventHub(max_jobs=2)
    for job in ("a", "b", "c"):
        hub.publish(event(job, 0))
    with hub.subscribe("a") as sub:
        assert sub.backlog == []
    with hub.subscribe("c") as sub:
        assert len(sub.backlog) == 1


def test_close_all_wakes_subscribers() -> None:
    hub = EventHub(max_jobs=2)
    with hub.subscribe("a") as sub:
        hub.close_all()
        assert sub.queue.get_nowait() is None
