"""The order in which a worker looks at a model's priority queues (`priority_order`)."""

from __future__ import annotations

from collections import Counter, deque

import pytest

from common.settings import WorkerSettings
from schemas.jobs import PRIORITIES
from worker.worker import priority_order


def run(waiting: dict[str, int], lower_every: int, takes: int | None = None) -> list[str]:
    """The priorities of the jobs a worker takes, one after another, from queues that hold `waiting`."""
    queues = {p: deque(range(waiting.get(p, 0))) for p in PRIORITIES}
    taken: list[str] = []
    while any(queues.values()) and (takes is None or len(taken) < takes):
        for level in priority_order(len(taken), lower_every):
            if queues[PRIORITIES[level]]:
                queues[PRIORITIES[level]].popleft()
                taken.append(PRIORITIES[level])
                break
    return taken


def test_strict_order_when_turned_off() -> None:
    assert run({"high": 5, "normal": 2, "low": 2}, 0) == ["high"] * 5 + ["normal"] * 2 + ["low"] * 2


def test_every_nth_job_comes_from_below_high() -> None:
    assert run({"high": 6, "normal": 1, "low": 1}, 2) == [
        "high",
        "normal",
        "high",
        "low",
        "high",
        "high",
        "high",
        "high",
    ]


@pytest.mark.parametrize(
    ("waiting", "shares"),
    [
        ({"high": 10**4, "normal": 10**4, "low": 10**4}, {"high": 48, "normal": 12, "low": 4}),
        ({"high": 10**4, "low": 10**4}, {"high": 48, "low": 16}),
        ({"normal": 10**4, "low": 10**4}, {"normal": 60, "low": 4}),
    ],
)
def test_lower_priorities_get_a_share_while_higher_ones_keep_coming(waiting, shares) -> None:
    """The default, 4: while every priority has jobs waiting, `normal` gets 3 of every 16 jobs and
    `low` 1; a priority with nothing waiting gives its turns to the next one down, then up."""
    every = WorkerSettings.model_fields["lower_priority_every"].default
    assert every == 4
    assert Counter(run(waiting, every, takes=64)) == shares


def test_with_one_priority_waiting_every_turn_takes_it() -> None:
    assert run({"low": 20}, 4) == ["low"] * 20
    assert run({"high": 20}, 4) == ["high"] * 20


def test_one_is_refused() -> None:
    with pytest.raises(ValueError, match="lower_priority_every"):
        WorkerSettings(lower_priority_every=1)


class FakeQueue:
    """A job queue as `basic.get` sees it: the oldest message, or None when empty."""

    def __init__(self, priority: str, count: int) -> None:
        self.messages = deque(f"{priority}-{n}" for n in range(count))

    async def get(self, no_ack: bool, fail: bool) -> str | None:
        return self.messages.popleft() if self.messages else None


async def test_the_worker_takes_jobs_in_that_order() -> None:
    """`Worker._next_job` itself (one model): counting every message it takes, it follows
    `priority_order` (every 2nd job starts at normal, every 4th at low)."""
    from worker.worker import Worker

    worker = Worker(WorkerSettings(lower_priority_every=2), store=None, runners={}, registry=None)  # type: ignore[arg-type]
    queues = [[FakeQueue("high", 6)], [FakeQueue("normal", 1)], [FakeQueue("low", 1)]]
    worker._job_queues = [queues, queues]  # type: ignore[list-item]  # the same queues through either lane
    taken = [await worker._next_job(turn, lane=turn % 2) for turn in range(9)]
    assert taken == ["high-0", "normal-0", "high-1", "low-0", "high-2", "high-3", "high-4", "high-5", None]
