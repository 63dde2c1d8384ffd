"""Fan-out of job events to WebSocket clients, with a short memory for clients that join late."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from schemas.messages import JobEvent

# Enough for any job: one event per denoising step plus the phases.
MAX_EVENTS_PER_JOB = 2000


@dataclass(eq=False)
class Subscription:
    job_id: str
    backlog: list[JobEvent]
    queue: asyncio.Queue[JobEvent | None] = field(default_factory=asyncio.Queue)


class EventHub:
    """Every event this gateway receives passes through `publish`.

    It keeps the recent events of the last `max_jobs` jobs so a client that connects right after
    submitting (or mid-job) first gets what it missed, then the live events, with no gap.
    """

    def __init__(self, max_jobs: int) -> None:
        self._max_jobs = max_jobs
        self._recent: OrderedDict[str, dict[int, JobEvent]] = OrderedDict()
        self._subscribers: dict[str, set[Subscription]] = {}

    def publish(self, event: JobEvent) -> None:
        events = self._recent.setdefault(event.job_id, {})
        if event.seq in events:
            return  # the gateway's own `queued` event also comes back from the broker
        events[event.seq] = event
        if len(events) > MAX_EVENTS_PER_JOB:
            del events[min(events)]
        self._recent.move_to_end(event.job_id)
        while len(self._recent) > self._max_jobs:
            self._recent.popitem(last=False)
        for sub in self._subscribers.get(event.job_id, ()):
            sub.queue.put_nowait(event)

    @contextmanager
    def subscribe(self, job_id: str) -> Iterator[Subscription]:
        # Snapshot and registration happen without an await in between: nothing slips through.
        backlog = sorted(self._recent.get(job_id, {}).values(), key=lambda e: e.seq)
        sub = Subscription(job_id, backlog=backlog)
        self._subscribers.setdefault(job_id, set()).add(sub)
        try:
            yield sub
        finally:
            subs = self._subscribers.get(job_id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subscribers[job_id]

    def close_all(self) -> None:
        """Wake every subscriber with None so its connection can close (gateway shutdown)."""
        for subs in self._subscribers.values():
            for sub in subs:
                sub.queue.put_nowait(None)

    @property
    def subscriber_count(self) -> int:
        return sum(len(s) for s in self._subscribers.values())
