"""Fan-out of job events inside one gateway: from the broker consumer to WebSocket/SSE clients."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from schemas.messages import JobEvent

# Events a subscriber may have waiting. A client that falls further behind (a stalled connection
# on a stream of all its jobs) has its stream ended rather than the gateway's memory filled; it
# resumes from the record (`since`, `Last-Event-ID`).
SUBSCRIBER_BACKLOG = 10_000


@dataclass(eq=False)
class Subscription:
    job_ids: frozenset[str] | None  # None: every job (of `owner`, when set)
    owner: str | None = None
    queue: asyncio.Queue[JobEvent | None] = field(default_factory=lambda: asyncio.Queue(SUBSCRIBER_BACKLOG))
    overflowed: bool = False  # an event found the backlog full: the stream must end

    def offer(self, event: JobEvent | None) -> None:
        if self.overflowed:
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.overflowed = True


class EventHub:
    """Every event this gateway receives passes through `publish` to the subscribers of its job.

    There is no memory here: what happened before a client subscribed comes from the job's record,
    which holds every event (see gateway/streams.py).
    """

    def __init__(self) -> None:
        self._by_job: dict[str, set[Subscription]] = {}
        self._everything: set[Subscription] = set()
        self.listeners: list[Callable[[JobEvent], None]] = []  # called with every event, first

    def publish(self, event: JobEvent) -> None:
        for listener in self.listeners:
            listener(event)
        for sub in self._by_job.get(event.job_id, ()):
            sub.offer(event)
        for sub in self._everything:
            if sub.owner is None or sub.owner == event.owner:
                sub.offer(event)

    @contextmanager
    def subscribe(self, job_ids: list[str] | None, owner: str | None = None) -> Iterator[Subscription]:
        """Events of the listed jobs, or (job_ids None) of every job, or every job of `owner`."""
        sub = Subscription(None if job_ids is None else frozenset(job_ids), owner)
        if sub.job_ids is None:
            self._everything.add(sub)
        else:
            for job_id in sub.job_ids:
                self._by_job.setdefault(job_id, set()).add(sub)
        try:
            yield sub
        finally:
            self._everything.discard(sub)
            for job_id in sub.job_ids or ():
                subs = self._by_job.get(job_id)
                if subs is not None:
                    subs.discard(sub)
                    if not subs:
                        del self._by_job[job_id]

    def close_all(self) -> None:
        """Wake every subscriber with None so its connection can close (gateway shutdown)."""
        for sub in {*self._everything, *(s for subs in self._by_job.values() for s in subs)}:
            sub.offer(None)

    @property
    def subscriber_count(self) -> int:
        return len({*self._everything, *(s for subs in self._by_job.values() for s in subs)})
