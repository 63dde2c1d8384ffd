"""The gateway's side of RabbitMQ: publish jobs with confirms, receive every job event,
turn dead-lettered jobs into failed jobs."""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiormq
import structlog
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage, AbstractRobustConnection
from aio_pika.exceptions import ChannelInvalidStateError

from common.retry import patiently
from common.store import STORE_ERRORS
from common.topology import DOWNLOAD_KEY, Topology, connect, expiry_step, to_amqp
from gateway.events import EventHub
from schemas.jobs import PRIORITIES, GenerationParams, JobRecord, Priority
from schemas.messages import (
    CancelMessage,
    DecodeError,
    ExpiryCheck,
    JobAvailable,
    JobDropped,
    JobEvent,
    JobMessage,
    decode,
    left_in_queue,
)

log = structlog.get_logger("gateway.broker")

# Pause before handling again a dead-letter notice or expiry check whose handling failed.
DEAD_LETTER_RETRY_S = 5.0
# How long the gateway tries to publish a job end of its own (a cancel) through a broker outage.
END_PUBLISH_PATIENCE_S = 300.0
# How long a stopping gateway waits for those publishes.
END_PUBLISH_GRACE_S = 5.0

# A submission reuses a model's queue figures read this recently (by any submission of this
# gateway), plus the jobs this gateway queued since: under load, one read serves many jobs.
STATS_MAX_AGE_S = 0.1

# (job, reason, the first x-death entry: reason, queue, count, original-expiration, ...)
DeadLetterHandler = Callable[[JobMessage, str, dict[str, Any]], Awaitable[None]]
ExpiryHandler = Callable[["ExpiryCheck"], Awaitable[None]]


@dataclass(frozen=True)
class QueueStats:
    messages: int  # waiting, all priorities together
    consumers: int  # workers taking from the queue(s)
    waiting: dict[str, int] = field(default_factory=dict)  # by priority (model queues only)
    # Messages of jobs that ended before a worker started them, still in the queues: in none of
    # the figures above.
    ended: int = 0

    def ahead_of(self, priority: Priority) -> int:
        """Jobs a new job of this priority would wait behind: those at the same or a higher one."""
        if not self.waiting:
            return self.messages
        return sum(self.waiting[p] for p in PRIORITIES[: PRIORITIES.index(priority) + 1])

    def plus(self, queued: dict[str, int]) -> QueueStats:
        """These figures with jobs queued since added, by priority."""
        if not any(queued.values()):
            return self
        waiting = {p: n + queued.get(p, 0) for p, n in self.waiting.items()}
        return QueueStats(messages=sum(waiting.values()), consumers=self.consumers, waiting=waiting, ended=self.ended)

    def without(self, ended: dict[str, int]) -> QueueStats:
        """These figures (counting every message) less the messages of ended jobs, by priority."""
        if not any(ended.values()):
            return self
        waiting = {p: max(0, n - ended.get(p, 0)) for p, n in self.waiting.items()}
        live = sum(waiting.values())
        return QueueStats(messages=live, consumers=self.consumers, waiting=waiting, ended=self.messages - live)


class EndedInQueue:
    """The messages of jobs that ended before any worker started them (cancelled, or expired,
    while queued), which stay in the model's queue until a worker takes them and drops them.

    A gateway learns of them from the jobs' terminal events (every gateway receives every event)
    and of their leaving from the JobDropped notice of the worker that dropped them, in either
    order (an end published again after the drop is ignored). It knows only those that ended
    since it started: older ones count as waiting jobs (figures err high). A notice that never
    arrives (the broker was down) leaves an entry for a message no longer queued (figures err
    low by one); since a queue cannot hold more ended jobs than messages, each read of a queue
    trims its oldest entries down to the queue's length, which clears such entries at the latest
    when the queue is empty."""

    def __init__(self, memory: int = 100_000) -> None:
        self._memory = memory
        self._ended: dict[tuple[str, str], OrderedDict[str, None]] = {}  # (model, priority) -> job ids
        self._dropped: OrderedDict[str, None] = OrderedDict()  # the last ids dropped, their end seen or not

    def saw_end(self, record: JobRecord) -> None:
        if not left_in_queue(record):
            return
        if record.job_id in self._dropped:
            return  # its worker dropped it already (or this is the end published once more)
        assert isinstance(record.params, GenerationParams)
        self._add(self._ended.setdefault((record.model, record.params.priority), OrderedDict()), record.job_id)

    def dropped(self, notice: JobDropped) -> None:
        ids = self._ended.get((notice.model, notice.priority))
        if ids is not None:
            ids.pop(notice.job_id, None)
        self._add(self._dropped, notice.job_id)

    def counts(self, model: str) -> dict[str, int]:
        return {p: len(self._ended.get((model, p), ())) for p in PRIORITIES}

    def trim(self, model: str, waiting: dict[str, int]) -> None:
        """A queue read just now holds `waiting[p]` messages: no more of them can be ended jobs."""
        for priority, messages in waiting.items():
            ids = self._ended.get((model, priority))
            while ids and len(ids) > messages:
                ids.popitem(last=False)

    def _add(self, ids: OrderedDict[str, None], job_id: str) -> None:
        ids[job_id] = None
        while len(ids) > self._memory:
            ids.popitem(last=False)


@dataclass
class _RecentStats:
    stats: QueueStats
    at: float  # when the read began (event loop time)
    queued_before: dict[str, int]  # this gateway's running count of the model's jobs, by priority, then


class GatewayBroker:
    def __init__(self, amqp_url: str, topology: Topology, hub: EventHub) -> None:
        self._url = amqp_url
        self._topology = topology
        self._hub = hub
        self._connection: AbstractRobustConnection | None = None
        self._jobs: AbstractExchange | None = None
        self._control: AbstractExchange | None = None
        self._channel: AbstractChannel | None = None
        self._stats_channel: AbstractChannel | None = None
        self._consuming: list[AbstractChannel] = []
        # Best-effort notices (job events, JobAvailable) go without publisher confirms.
        self._notify_events: AbstractExchange | None = None
        self._end_events: AbstractExchange | None = None  # on the confirmed channel
        self._notify_control: AbstractExchange | None = None
        self._recent: dict[str, _RecentStats] = {}
        self._reads: dict[str, asyncio.Future[None]] = {}
        self._queued: dict[str, dict[str, int]] = {}  # model -> priority -> jobs this gateway queued
        self._waking: set[str] = set()  # models with a JobAvailable being sent
        self._wake_again: set[str] = set()  # ... and another job queued meanwhile
        self._tasks: set[asyncio.Task[None]] = set()
        self._ending: set[asyncio.Task[None]] = set()  # publish_end_soon's, also in _tasks
        self.ended = EndedInQueue()

    async def start(
        self,
        model_ids: list[str],
        on_dead_letter: DeadLetterHandler,
        on_expiry: ExpiryHandler,
        connect_timeout: float = 30.0,
    ) -> None:
        self._connection = await connect(self._url, connect_timeout)
        # Publisher confirms: a publish returns only once the broker has the message.
        # on_return_raises: a job no queue would take (mandatory) fails the publish instead of vanishing.
        channel = self._channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
        # Declaring every model's queue here means a job accepted before any worker
        # started is stored, not dropped by an exchange with no bound queue.
        self._jobs, _ = await self._topology.declare_jobs(channel, model_ids)
        await self._topology.declare_expiry(channel)
        self._control = await self._topology.declare_control(channel)
        self._end_events = await self._topology.declare_events(channel)
        notify_channel = await self._connection.channel(publisher_confirms=False)
        self._notify_events = await self._topology.declare_events(notify_channel)
        self._notify_control = await self._topology.declare_control(notify_channel)

        # Each gateway has its own exclusive queue on the events exchange, so every
        # gateway sees every event of every job.
        consume_channel = await self._connection.channel()
        queue = await consume_channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(self._topology.events_exchange, routing_key="job.#")
        await queue.bind(self._topology.events_exchange, routing_key=Topology.dropped_key("#"))
        await queue.consume(self._on_event, no_ack=True)

        # Gateways share the dead-letter notifications: each dead job is handled once.
        dead_channel = await self._connection.channel()
        await dead_channel.set_qos(prefetch_count=10)
        # Declared (not just named) on this channel: a robust channel restores the consumers only
        # of the queues it declared, after a reconnect.
        quorum = {"x-queue-type": "quorum"}
        dead = await dead_channel.declare_queue(self._topology.dead_letter_notify_queue, durable=True, arguments=quorum)
        await dead.consume(lambda m: self._on_dead_letter(m, on_dead_letter))
        due = await dead_channel.declare_queue(self._topology.expiry_due, durable=True, arguments=quorum)
        await due.consume(lambda m: self._on_expiry_due(m, on_expiry))
        # Held here: the robust connection holds its channels weakly, and while it reconnects
        # nothing else does; a channel collected then would come back without its queue and
        # consumers (no events, no expiry checks, no dead letters handled after the outage).
        self._consuming = [consume_channel, dead_channel]

    async def close(self) -> None:
        # Job ends not yet published (a cancel answered just before the gateway was stopped) get
        # a few seconds: nothing else would publish them.
        if self._ending:
            await asyncio.wait(list(self._ending), timeout=END_PUBLISH_GRACE_S)
        for task in list(self._tasks):
            task.cancel()
        if self._connection is not None:
            await self._connection.close()

    @property
    def connection(self) -> AbstractRobustConnection:
        assert self._connection is not None
        return self._connection

    @property
    def connected(self) -> bool:
        return self._connection is not None and not self._connection.is_closed and self._connection.connected.is_set()

    async def publish_expiry_check(self, message: JobMessage, max_queue_s: int) -> None:
        """The job's expiry check, confirmed: published before the job's record is stored and the
        job published, so that a record left `queued` by a gateway that died before publishing
        the job still ends (`expired`) when the check falls due."""
        download = message.mode == "download"
        model = message.params.model
        check = ExpiryCheck(job_id=message.job_id, model=model, max_queue_s=max_queue_s, download=download)
        await self.publish_check(check, max_queue_s)

    async def publish_check(self, check: ExpiryCheck, delay_s: int) -> None:
        """An expiry check due in `delay_s`, confirmed: into the longest delay queue not past it,
        carrying the seconds left after that round (`left_s`), for which the expiry handler
        publishes it again; no clock is read, the queues' time-to-lives measure the time."""
        assert self._channel is not None
        step = expiry_step(delay_s)
        await self._channel.default_exchange.publish(
            to_amqp(check.model_copy(update={"left_s": max(0, delay_s - step)}), persistent=True),
            routing_key=self._topology.expiry_wait_queue(step),
            mandatory=True,
        )

    async def publish_job(self, message: JobMessage) -> None:
        assert self._jobs is not None
        if message.mode == "download":
            await self._jobs.publish(to_amqp(message, persistent=True), routing_key=DOWNLOAD_KEY, mandatory=True)
            return
        model, priority = message.params.model, message.params.priority
        await self._jobs.publish(
            to_amqp(message, persistent=True), routing_key=Topology.job_key(model, priority), mandatory=True
        )
        counts = self._queued.setdefault(model, dict.fromkeys(PRIORITIES, 0))
        counts[priority] += 1
        self._wake(model)

    def _wake(self, model: str) -> None:
        """Tell idle workers a job of this model is queued (JobAvailable), in the background and
        coalesced: while one notice is on its way, jobs queued meanwhile make just one more."""
        if model in self._waking:
            self._wake_again.add(model)
            return
        self._waking.add(model)
        task = asyncio.create_task(self._send_wakes(model))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_wakes(self, model: str) -> None:
        assert self._notify_control is not None
        try:
            while True:
                self._wake_again.discard(model)
                try:  # best effort: idle workers also poll
                    await self._notify_control.publish(
                        to_amqp(JobAvailable(model=model)), routing_key="", mandatory=False
                    )
                except Exception as exc:
                    log.warning("job_available_not_sent", model=model, error=str(exc))
                if model not in self._wake_again:
                    return
        finally:
            self._waking.discard(model)

    async def publish_event(self, event: JobEvent) -> None:
        """Best effort, without a confirm: the job's record holds the same state."""
        assert self._notify_events is not None
        key = Topology.event_key(event.job_id, event.status)
        await self._notify_events.publish(to_amqp(event), routing_key=key, mandatory=False)

    async def publish_end(self, event: JobEvent) -> None:
        """A job's terminal event, confirmed: the gateway's own ends (cancelled, expired, dead-
        lettered) must reach webhooks and streams, which no later event would make up for."""
        assert self._end_events is not None
        key = Topology.event_key(event.job_id, event.status)
        await self._end_events.publish(to_amqp(event), routing_key=key, mandatory=False)

    def publish_end_soon(self, event: JobEvent) -> None:
        """publish_end in the background, tried again for up to END_PUBLISH_PATIENCE_S (a broker
        outage), so that the request that ended the job need not wait for it."""

        async def publish() -> None:
            try:
                await patiently(
                    lambda: self.publish_end(event), END_PUBLISH_PATIENCE_S, "publish_end", log_as="event_publish_retry"
                )
            except Exception as exc:  # the record has it; streams catch up from it
                log.error("event_publish_failed", job_id=event.job_id, status=event.status, error=str(exc))

        task = asyncio.create_task(publish())
        self._tasks.add(task)
        self._ending.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(self._ending.discard)

    async def publish_dropped(self, message: JobMessage) -> None:
        """A generation job's message left its queue without a worker dropping it (it was
        dead-lettered): if the job had ended while queued, gateways stop counting it apart."""
        assert self._notify_events is not None
        if message.mode == "download" or not isinstance(message.params, GenerationParams):
            return
        notice = JobDropped(job_id=message.job_id, model=message.params.model, priority=message.params.priority)
        await self._notify_events.publish(to_amqp(notice), routing_key=Topology.dropped_key(message.job_id))

    async def publish_cancel(self, job_id: str) -> None:
        """Tell every worker: stop this job if you are running it, drop it if it reaches you."""
        assert self._control is not None
        # Not mandatory: with no worker connected nobody needs telling, and that is no error.
        await self._control.publish(to_amqp(CancelMessage(job_id=job_id)), routing_key="", mandatory=False)

    async def queue_stats(self, message: JobMessage, fresh: bool = False) -> QueueStats:
        """What waits where this job goes, and who takes from there: figures read at most
        STATS_MAX_AGE_S ago (now, if `fresh`), plus the jobs this gateway queued since."""
        if message.mode == "download":
            return await self.stats_of(self._topology.downloads_queue)
        model = message.params.model
        recent = self._recent.get(model)
        now = asyncio.get_running_loop().time()
        if fresh or recent is None or now - recent.at > STATS_MAX_AGE_S:
            # One read at a time per model; submissions arriving meanwhile share it.
            read = self._reads.get(model)
            if read is None or fresh:
                read = self._reads[model] = asyncio.ensure_future(self._read_stats(model, now))
            await asyncio.shield(read)
            recent = self._recent[model]
        queued = self._queued.get(model, {})
        since = recent.stats.plus({p: n - recent.queued_before.get(p, 0) for p, n in queued.items()})
        return since.without(self.ended.counts(model))

    async def _read_stats(self, model: str, at: float) -> None:
        # Jobs this gateway queues while the read is under way may be counted twice: the figures
        # err high, never low, until the next read.
        before = dict(self._queued.get(model, {}))
        try:
            self._recent[model] = _RecentStats(await self._read_model_queues(model), at, before)
        finally:
            if self._reads.get(model) is asyncio.current_task():
                del self._reads[model]

    async def model_stats(self, model_id: str) -> QueueStats:
        """Jobs waiting for a model, by priority, and the workers serving it (passive declares);
        the messages of jobs that ended while queued are counted apart (`ended`)."""
        return (await self._read_model_queues(model_id)).without(self.ended.counts(model_id))

    async def _read_model_queues(self, model_id: str) -> QueueStats:
        """Every message in the model's queues, by priority, and the workers serving it."""
        waiting = {p: (await self.stats_of(self._topology.job_queue(model_id, p))).messages for p in PRIORITIES}
        workers = (await self.stats_of(self._topology.workers_queue(model_id))).consumers
        self.ended.trim(model_id, waiting)
        return QueueStats(messages=sum(waiting.values()), consumers=workers, waiting=waiting)

    @asynccontextmanager
    async def exclusive(self, name: str, timeout: float) -> AsyncIterator[None]:
        """A lock shared by every gateway: an exclusive queue `<ns>.lock.<name>`, which only one
        connection can hold; it goes away with its holder's connection if that gateway dies."""
        assert self._connection is not None
        queue_name = f"{self._topology.namespace}.lock.{name}"
        deadline = asyncio.get_running_loop().time() + timeout
        delay = 0.01
        while True:
            channel = await self._connection.channel()
            try:
                queue = await channel.declare_queue(queue_name, exclusive=True, auto_delete=True, robust=False)
                break
            except aiormq.exceptions.ChannelLockedResource:
                with contextlib.suppress(Exception):
                    await channel.close()
                if asyncio.get_running_loop().time() + delay > deadline:
                    raise TimeoutError(name) from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.2)
            except BaseException:  # any other failure (the connection dropped): no channel left open
                with contextlib.suppress(Exception):
                    await channel.close()
                raise
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                await queue.delete(if_unused=False, if_empty=False)
            with contextlib.suppress(Exception):
                await channel.close()

    async def stats_of(self, queue_name: str) -> QueueStats:
        assert self._connection is not None
        if self._stats_channel is None or self._stats_channel.is_closed:
            self._stats_channel = await self._connection.channel()
        # robust=False: a robust channel would hand back its cached declaration, with stale counts.
        result = await self._stats_channel.declare_queue(queue_name, passive=True, robust=False)
        return QueueStats(
            messages=result.declaration_result.message_count, consumers=result.declaration_result.consumer_count
        )

    async def _on_event(self, message: AbstractIncomingMessage) -> None:
        try:
            event = decode(message.body)
        except DecodeError as exc:
            log.warning("bad_event", reason=exc.reason)
            return
        if isinstance(event, JobEvent):
            if event.job is not None:
                self.ended.saw_end(event.job)
            self._hub.publish(event)
        elif isinstance(event, JobDropped):
            self.ended.dropped(event)

    async def _on_expiry_due(self, message: AbstractIncomingMessage, handler: ExpiryHandler) -> None:
        await _settle(message, ExpiryCheck, handler)

    async def _on_dead_letter(self, message: AbstractIncomingMessage, handler: DeadLetterHandler) -> None:
        headers = message.headers or {}
        reason = str(headers.get("x-first-death-reason", "unknown"))
        deaths = headers.get("x-death") or [{}]
        death = dict(deaths[0]) if isinstance(deaths, list) and isinstance(deaths[0], dict) else {}
        await _settle(message, JobMessage, lambda job: handler(job, reason, death))


async def _settle(message: AbstractIncomingMessage, kind: type, handler: Callable[[Any], Awaitable[None]]) -> None:
    """Decode and handle a message for the gateway to act on: ack when done, or when there is
    nothing to do (a message of another kind, or one that does not decode: the kept dead-letter
    queue holds a copy); if handling fails because the store or the broker is down, handle it
    again after a pause, for as long as it takes: it is not handed back, which RabbitMQ 4 would
    count against a default delivery limit of its quorum queues, and drop the message. (If the
    channel closes meanwhile, RabbitMQ takes the message back and delivers it again.) Any other
    failure (a bug, a record that no longer reads) hands it back after the pause, so that such
    messages do not take up the channel's prefetch for good."""
    try:
        envelope = decode(message.body)
    except DecodeError as exc:
        log.warning("undecodable_message", routing_key=message.routing_key, reason=exc.reason)
        await message.ack()
        return
    if isinstance(envelope, kind):
        while True:
            try:
                await handler(envelope)
                break
            except Exception as exc:
                log.exception("handling_failed", job_id=getattr(envelope, "job_id", None))
                await asyncio.sleep(DEAD_LETTER_RETRY_S)  # do not spin
                if channel_closed(message):  # RabbitMQ has it back, and delivers it again
                    return
                if not transient(exc):
                    await message.nack(requeue=True)
                    return
    await message.ack()


def transient(exc: BaseException) -> bool:
    """Whether a failure is the store or the broker being away, which passes."""
    return isinstance(exc, (*STORE_ERRORS, aiormq.exceptions.AMQPError, ConnectionError, TimeoutError, OSError))


def channel_closed(message: AbstractIncomingMessage) -> bool:
    """Whether the channel a message came on has closed (the connection dropped, the process is
    stopping): it can no longer be settled, and the broker has it back."""
    try:
        return message.channel.is_closed
    except ChannelInvalidStateError:
        return True
