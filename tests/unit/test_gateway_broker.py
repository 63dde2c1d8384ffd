"""The gateway broker's submission path without a broker: shared queue figures, coalesced wake-ups.

The fakes stand in for aio-pika's exchange and for the passive declarations: a publish settles
when the test lets it (as a confirm arrives when the broker sends it), a read returns what the
queues hold at that moment.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from common.topology import Topology, expiry_step
from gateway import broker as broker_module
from gateway.broker import GatewayBroker, QueueStats
from gateway.events import EventHub
from gateway.handlers import _queue_full
from schemas.jobs import DownloadParams, JobError, JobStatus, Phase
from schemas.messages import ExpiryCheck, JobAvailable, JobDropped, JobEvent, JobMessage, decode, encode
from schemas.registry import load_registry
from tests.helpers import queued_record, tiny_params

REGISTRY = load_registry()
MODEL = "ltx-tiny"
TOPOLOGY = Topology("unit")


class FakeExchange:
    """Publishes are recorded; each waits until `release` is set, like a confirm."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.messages: list = []  # the aio-pika messages, for their properties
        self.release = asyncio.Event()
        self.release.set()

    async def publish(self, message, routing_key: str, **_: object) -> None:
        self.sent.append((routing_key, message.body))
        self.messages.append(message)
        await self.release.wait()


class FakeChannel:
    def __init__(self) -> None:
        self.default_exchange = FakeExchange()


class Queues:
    """What the model's queues hold, as passive declarations tell (`stats_of`); each takes one
    loop turn, like a round trip. `reads` counts reads of the model's figures (its last queue)."""

    def __init__(self) -> None:
        self.waiting = {"high": 0, "normal": 0, "low": 0}
        self.reads = 0
        self._names = {TOPOLOGY.job_queue(MODEL, p): p for p in self.waiting}

    async def stats_of(self, name: str) -> QueueStats:
        await asyncio.sleep(0)
        if name == TOPOLOGY.workers_queue(MODEL):
            self.reads += 1
            return QueueStats(messages=0, consumers=1)
        return QueueStats(messages=self.waiting[self._names[name]], consumers=0)


def make_broker(queues: Queues) -> tuple[GatewayBroker, FakeExchange]:
    broker = GatewayBroker("amqp://unused", TOPOLOGY, EventHub())
    control = FakeExchange()
    broker._channel = FakeChannel()  # type: ignore[assignment]
    broker._jobs = FakeExchange()  # type: ignore[assignment]
    broker._notify_control = control  # type: ignore[assignment]
    broker.stats_of = queues.stats_of  # type: ignore[method-assign]
    return broker, control


def job(priority: str = "normal") -> JobMessage:
    params = tiny_params(priority=priority)
    return JobMessage(job_id="0b6f2ad6-4f7e-4c55-9b1f-3f0a2c1d9e11", mode="text-to-video", params=params)


async def test_concurrent_submissions_share_one_read_and_count_their_own_jobs() -> None:
    queues = Queues()
    queues.waiting["normal"] = 5
    broker, _ = make_broker(queues)
    figures = await asyncio.gather(*(broker.queue_stats(job()) for _ in range(20)))
    assert queues.reads == 1 and {f.messages for f in figures} == {5}
    # Jobs this gateway queues are added to the figures it read, by priority.
    await broker.publish_job(job("high"))
    await broker.publish_job(job())
    stats = await broker.queue_stats(job())
    assert queues.reads == 1
    assert stats.waiting == {"high": 1, "normal": 6, "low": 0} and stats.ahead_of("normal") == 7


async def test_figures_are_read_again_when_old_or_when_asked_fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    queues = Queues()
    broker, _ = make_broker(queues)
    await broker.queue_stats(job())
    await broker.publish_job(job())
    queues.waiting["normal"] = 1  # the broker now holds the job this gateway queued
    stats = await broker.queue_stats(job(), fresh=True)
    assert queues.reads == 2 and stats.messages == 1  # counted once, not twice
    monkeypatch.setattr(broker_module, "STATS_MAX_AGE_S", 0.0)
    queues.waiting["normal"] = 0  # a worker took it
    assert (await broker.queue_stats(job())).messages == 0 and queues.reads == 3


async def test_a_failed_read_reaches_every_waiter_and_the_next_one_reads_again() -> None:
    queues = Queues()
    broker, _ = make_broker(queues)

    failed = 0

    async def broken(name: str) -> QueueStats:
        nonlocal failed
        failed += 1
        await asyncio.sleep(0)
        raise ConnectionError("broker gone")

    broker.stats_of = broken  # type: ignore[method-assign]
    results = await asyncio.gather(*(broker.queue_stats(job()) for _ in range(3)), return_exceptions=True)
    assert failed == 1 and all(isinstance(r, ConnectionError) for r in results)
    broker.stats_of = queues.stats_of  # type: ignore[method-assign]
    assert (await broker.queue_stats(job())).messages == 0 and queues.reads == 1


async def test_job_available_notices_are_coalesced_but_none_is_lost() -> None:
    broker, control = make_broker(Queues())
    control.release.clear()  # notices wait for their confirm
    await broker.publish_job(job())
    await asyncio.sleep(0)  # the first notice is on its way
    for _ in range(9):
        await broker.publish_job(job())
    await asyncio.sleep(0)
    assert len(control.sent) == 1
    control.release.set()
    # The jobs queued while the first was sent make exactly one more notice.
    while broker._tasks:
        await asyncio.gather(*broker._tasks)
    assert len(control.sent) == 2
    assert all(isinstance(decode(body), JobAvailable) for _, body in control.sent)
    await broker.publish_job(job())  # idle again: a new job sends at once
    await asyncio.gather(*broker._tasks)
    assert len(control.sent) == 3


async def test_job_and_expiry_check_are_both_published() -> None:
    broker, _ = make_broker(Queues())
    await broker.publish_expiry_check(job("low"), REGISTRY.models[MODEL].max_queue_s)
    assert broker._jobs.sent == []  # type: ignore[union-attr]
    await broker.publish_job(job("low"))
    assert [key for key, _ in broker._jobs.sent] == [Topology.job_key(MODEL, "low")]  # type: ignore[union-attr]
    sent = broker._channel.default_exchange.sent  # type: ignore[union-attr]
    assert [key for key, _ in sent] == [Topology("unit").expiry_wait_queue(2048)]  # 3600 s: 2048 s, then the rest


async def test_a_check_waits_in_the_longest_delay_queue_that_fits_its_time() -> None:
    """RabbitMQ expires a message only at its queue's head, so each delay queue has one
    time-to-live of its own, and a check takes the longest that its job's time left allows:
    checks of different limits (models, downloads, registries changed) never wait behind
    each other."""
    broker, _ = make_broker(Queues())
    download = JobMessage(
        job_id="5d0c8a57-9f7e-4d8a-b1b1-0c2e6f0a7d21", mode="download", params=DownloadParams(model=MODEL, repo=None)
    )
    await broker.publish_expiry_check(job(), 600)
    await broker.publish_expiry_check(download, 86400)
    await broker.publish_expiry_check(job(), 1)
    exchange = broker._channel.default_exchange  # type: ignore[union-attr]
    topology = Topology("unit")
    assert [key for key, _ in exchange.sent] == [topology.expiry_wait_queue(step) for step in (512, 65536, 1)]
    checks = [decode(body) for _, body in exchange.sent]
    assert all(isinstance(check, ExpiryCheck) for check in checks)
    # Each carries the seconds it still has to wait once that queue's time is out.
    assert [(c.download, c.max_queue_s, c.model, c.left_s) for c in checks] == [
        (False, 600, MODEL, 600 - 512),
        (True, 86400, MODEL, 86400 - 65536),
        (False, 1, MODEL, 0),
    ]
    assert [m.expiration for m in exchange.messages] == [None, None, None]  # the queue's time-to-live


@pytest.mark.parametrize(
    ("left_s", "step"), [(0.2, 1), (1, 1), (1.9, 1), (2, 2), (600, 512), (3600, 2048), (65536, 65536), (10**6, 65536)]
)
def test_expiry_steps(left_s: float, step: int) -> None:
    assert expiry_step(left_s) == step


def ended(job_id: str, priority: str = "normal", **changes: object) -> JobEvent:
    """The terminal event of a job cancelled while queued (`changes` on its record)."""
    fields: dict[str, object] = {"status": JobStatus.CANCELLED, "phase": Phase.CANCELLED, "seq": 1}
    record = queued_record(job_id, params=tiny_params(priority=priority)).model_copy(update=fields | changes)
    return JobEvent.from_record(record)


def dropped(job_id: str, priority: str = "normal") -> JobDropped:
    return JobDropped(job_id=job_id, model=MODEL, priority=priority)  # type: ignore[arg-type]


async def receive(broker: GatewayBroker, *envelopes: JobEvent | JobDropped) -> None:
    """Deliver these as the gateway's queue on the events exchange would."""
    for envelope in envelopes:
        await broker._on_event(FakeIncoming(envelope))  # type: ignore[arg-type]


class FakeIncoming:
    def __init__(self, envelope: JobEvent | JobDropped) -> None:
        self.body = encode(envelope)


async def test_jobs_that_ended_while_queued_are_not_counted_as_waiting() -> None:
    queues = Queues()
    queues.waiting = {"high": 1, "normal": 4, "low": 0}  # 2 normal ones cancelled, 1 high expired
    broker, _ = make_broker(queues)
    expired = JobError(code="expired", message="no worker took the job")
    await receive(broker, ended("a"), ended("b"), ended("h", "high", status=JobStatus.FAILED, error=expired))
    stats = await broker.queue_stats(job())
    assert stats.waiting == {"high": 0, "normal": 2, "low": 0} and stats.messages == 2 and stats.ended == 3
    assert stats.ahead_of("high") == 0 and stats.ahead_of("normal") == 2
    assert (await broker.model_stats(MODEL)).messages == 2  # the models listing and metrics alike

    # A worker took "a" off its queue and dropped it: the broker holds one message less.
    queues.waiting["normal"] = 3
    await receive(broker, dropped("a"))
    stats = await broker.queue_stats(job(), fresh=True)
    assert stats.waiting["normal"] == 2 and stats.ended == 2


async def test_a_drop_notice_before_the_end_event_is_not_counted_twice() -> None:
    queues = Queues()
    queues.waiting["normal"] = 2
    broker, _ = make_broker(queues)
    await receive(broker, dropped("a"))  # the worker read the record before the gateway's event came
    queues.waiting["normal"] = 1
    await receive(broker, ended("a"), ended("a"))  # the end published once more, too
    stats = await broker.queue_stats(job(), fresh=True)
    assert stats.messages == 1 and stats.ended == 0


async def test_ends_after_an_attempt_and_ends_of_jobs_never_queued_are_not_counted() -> None:
    queues = Queues()
    queues.waiting["normal"] = 3
    broker, _ = make_broker(queues)
    failed = JobError(code="publish_failed", message="the broker refused the job")
    await receive(
        broker,
        ended("ran", attempts=1),  # a worker had taken it: its message left the queue then
        ended("never-queued", status=JobStatus.FAILED, error=failed),
        ended("done", status=JobStatus.SUCCEEDED, phase=Phase.SUCCEEDED, attempts=1),
    )
    stats = await broker.queue_stats(job())
    assert stats.messages == 3 and stats.ended == 0


async def test_a_queue_read_trims_ended_jobs_to_the_messages_it_holds() -> None:
    """A drop notice lost in a broker outage must not make the queue look emptier for good."""
    queues = Queues()
    queues.waiting["normal"] = 3
    broker, _ = make_broker(queues)
    await receive(broker, ended("a"), ended("b"))
    assert (await broker.queue_stats(job())).messages == 1
    queues.waiting["normal"] = 1  # both were dropped, one notice lost; a new job waits
    stats = await broker.queue_stats(job(), fresh=True)
    assert stats.messages == 0 and stats.ended == 1  # errs low by the lost notice, no more
    queues.waiting["normal"] = 0
    await broker.queue_stats(job(), fresh=True)
    queues.waiting["normal"] = 1
    stats = await broker.queue_stats(job(), fresh=True)
    assert stats.messages == 1 and stats.ended == 0  # cleared once the queue was empty


def test_a_full_queue_counts_live_jobs_and_bounds_all_messages() -> None:
    limit = 5
    live = QueueStats(messages=limit, consumers=0, waiting={"normal": limit})
    assert _queue_full(live, limit, "m") == "5 jobs are waiting for model 'm' (limit 5)"
    mostly_ended = QueueStats(messages=limit - 1, consumers=0, waiting={"normal": limit - 1}, ended=40)
    assert _queue_full(mostly_ended, limit, "m") is None
    too_many = QueueStats(messages=limit - 1, consumers=0, waiting={"normal": limit - 1}, ended=46)
    why = _queue_full(too_many, limit, "m") or ""
    assert why.startswith("50 messages are in the queues of model 'm', 46 of them of jobs that ended")
    assert why.endswith(f"(limit {10 * limit})")


class Notice:
    """A dead-letter notice or expiry check as aio-pika hands it over, on its channel."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.settled: list[str] = []
        self.channel = SimpleNamespace(is_closed=False)

    async def ack(self) -> None:
        self.settled.append("ack")

    async def nack(self, requeue: bool = True) -> None:
        self.settled.append(f"nack(requeue={requeue})")


async def test_a_check_whose_handling_fails_is_handled_again_not_handed_back(monkeypatch) -> None:
    """RabbitMQ 4 counts a requeue against its quorum queues' default delivery limit (20) and
    drops the message past it: through a store outage, the gateway holds the check instead."""
    monkeypatch.setattr(broker_module, "DEAD_LETTER_RETRY_S", 0.0)
    failures = [ConnectionError("store down")] * 3
    handled: list[str] = []

    async def handler(check: ExpiryCheck) -> None:
        if failures:
            raise failures.pop()
        handled.append(check.job_id)

    check = ExpiryCheck(job_id="j", model=MODEL, max_queue_s=60)
    notice = Notice(encode(check))
    await broker_module._settle(notice, ExpiryCheck, handler)  # type: ignore[arg-type]
    assert handled == ["j"] and notice.settled == ["ack"]
    # A channel that closes meanwhile (the gateway stops): the broker has the check back.
    failures[:] = [ConnectionError("store down")]
    closing = Notice(encode(check))

    async def fails_as_the_channel_closes(check: ExpiryCheck) -> None:
        closing.channel.is_closed = True
        raise ConnectionError("store down")

    await broker_module._settle(closing, ExpiryCheck, fails_as_the_channel_closes)  # type: ignore[arg-type]
    assert closing.settled == []


async def test_a_gateway_end_is_published_with_a_confirm_through_a_broker_outage() -> None:
    broker, _ = make_broker(Queues())

    class Refusing(FakeExchange):
        refusals = 1

        async def publish(self, message, routing_key: str, **_: object) -> None:
            if self.refusals:
                self.refusals -= 1
                raise ConnectionError("the broker is away")
            await super().publish(message, routing_key)

    broker._end_events = exchange = Refusing()  # type: ignore[assignment]
    end = ended("c")
    broker.publish_end_soon(end)
    await asyncio.wait_for(asyncio.gather(*broker._tasks), 10)  # after one pause of 0.5 s
    assert [key for key, _ in exchange.sent] == [Topology.event_key("c", "cancelled")]


async def test_a_stopping_gateway_waits_a_little_for_the_ends_it_is_publishing() -> None:
    broker, _ = make_broker(Queues())

    class Confirming(FakeExchange):
        confirmed = 0

        async def publish(self, message, routing_key: str, **_: object) -> None:
            await super().publish(message, routing_key)
            self.confirmed += 1

    broker._end_events = exchange = Confirming()  # type: ignore[assignment]
    exchange.release.clear()  # the confirm is on its way
    broker.publish_end_soon(ended("c"))
    await asyncio.sleep(0)
    asyncio.get_running_loop().call_later(0.05, exchange.release.set)
    await broker.close()
    assert exchange.confirmed == 1, "the publish was waited for, not cancelled"


async def test_a_check_that_fails_for_another_reason_is_handed_back(monkeypatch) -> None:
    """Not the store or the broker being away (a bug, a record that no longer reads): held for
    good, such messages would take up the channel's prefetch, so it goes back to its queue."""
    monkeypatch.setattr(broker_module, "DEAD_LETTER_RETRY_S", 0.0)

    async def broken(check: ExpiryCheck) -> None:
        raise ValueError("a record that no longer reads")

    notice = Notice(encode(ExpiryCheck(job_id="j", model=MODEL, max_queue_s=60)))
    await broker_module._settle(notice, ExpiryCheck, broken)  # type: ignore[arg-type]
    assert notice.settled == ["nack(requeue=True)"]
