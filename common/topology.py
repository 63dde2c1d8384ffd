"""Names and declarations of every exchange and queue. Both processes declare through here.

- `<ns>.jobs`   direct exchange; three durable quorum queues per model, one per priority:
                `<ns>.jobs.<model>.high` (routing key `<model>.high`), `<ns>.jobs.<model>`
                (normal, key `<model>`) and `<ns>.jobs.<model>.low` (key `<model>.low`). Quorum
                queues honour no message priority before RabbitMQ 4.0, so a priority is a queue:
                workers take (basic.get) from the highest non-empty one. Model downloads use
                routing key `_download` and the queue `<ns>.downloads`, which every worker
                consumes. Messages: persistent `JobMessage`, without a TTL (a TTL would survive a
                requeue and expire a job handed back by a crashed worker).
- `<ns>.workers.<model>` one queue per model that never holds a message: each worker serving the
                model keeps a consumer on it, so its consumer count is the number of such workers.
- `<ns>.expiry.wait.<n>s` delay queues of fixed lengths, powers of two from 1 s to 65536 s
                (`EXPIRY_STEPS_S`), each with a queue time-to-live of its length: an `ExpiryCheck`
                per job waits in the longest that fits its time left (the model's `max_queue_s`,
                a download's `download_max_queue_s`), is dead-lettered through the fanout exchange
                `<ns>.expiry.due` to the queue `<ns>.expiry.due`, which gateways consume, and goes
                round again for the time still left while the job is still queued; a job still
                queued at its limit fails with code `expired`. Every check in a queue has the same
                time-to-live, so none waits behind a longer one (RabbitMQ expires messages only
                from a queue's head). Earlier versions' `<ns>.expiry.<model>` queues (one per
                model, per-message TTLs) still drain into `<ns>.expiry.due`.
- `<ns>.events` topic exchange; routing key `job.<job_id>.<status>`. Messages: `JobEvent`
                (workers publish theirs with publisher confirms; gateways publish theirs without,
                best effort, since the job's record holds the same state).
- `<ns>.control` fanout exchange; every worker binds an exclusive queue. Messages: `CancelMessage`
                (with publisher confirms), and `JobAvailable` (sent by the gateway in the
                background once a job is queued, without confirms, coalesced per model: while one
                notice for a model is on its way, the jobs queued meanwhile make one more after
                it; idle workers look at once instead of at their next poll).
- `<ns>.webhooks` quorum queue bound to `<ns>.events` with `job.#`, shared by the gateways that
                deliver webhooks (declared only where a signing secret is set).
- `<ns>.webhooks.wait.<n>s` one delay queue per pause between webhook attempts (1, 2, 4, 8, 16,
                32 and 60 s): a failed attempt's event waits there, holding no gateway's slot, and
                is dead-lettered back into `<ns>.webhooks` for its next attempt.
- `<ns>.dlx`    fanout exchange for dead letters (expired, delivery limit reached, rejected), bound
                to `<ns>.dead` (kept for operators) and `<ns>.dead.notify` (gateways consume it and
                mark those jobs failed).
"""

from __future__ import annotations

import asyncio
import urllib.parse
from dataclasses import dataclass

import aio_pika
import structlog
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue, AbstractRobustConnection

from schemas.jobs import PRIORITIES, Priority
from schemas.messages import EnvelopeHeader, encode

log = structlog.get_logger("broker")

# A message that has been delivered this many times without an ack goes to the dead-letter queue.
DELIVERY_LIMIT = 5
# Pauses between webhook attempts: after attempt n, the n-th (the last one for every later attempt).
WEBHOOK_PAUSES_S = (1, 2, 4, 8, 16, 32, 60)
# Routing key of model download jobs; model ids cannot contain "_", so it never names a model.
DOWNLOAD_KEY = "_download"
# The lengths of the expiry checks' delay queues, in seconds: a check takes the longest that fits
# the time its job has left, and goes round again for the rest (at most one round per length).
EXPIRY_STEPS_S = tuple(2**n for n in range(17))


def expiry_step(delay_s: float) -> int:
    """The delay queue (its length, s) for a check with `delay_s` left: the longest not past it
    (at least the shortest)."""
    return max([step for step in EXPIRY_STEPS_S if step <= delay_s], default=EXPIRY_STEPS_S[0])


@dataclass(frozen=True)
class Topology:
    namespace: str

    @property
    def jobs_exchange(self) -> str:
        return f"{self.namespace}.jobs"

    @property
    def events_exchange(self) -> str:
        return f"{self.namespace}.events"

    @property
    def control_exchange(self) -> str:
        return f"{self.namespace}.control"

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self.namespace}.dlx"

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.namespace}.dead"

    @property
    def dead_letter_notify_queue(self) -> str:
        return f"{self.namespace}.dead.notify"

    @property
    def expiry_due(self) -> str:
        """Both the fanout exchange and the queue that expiry checks reach when they are due."""
        return f"{self.namespace}.expiry.due"

    def expiry_wait_queue(self, step_s: int) -> str:
        return f"{self.namespace}.expiry.wait.{step_s}s"

    def earlier_expiry_queue(self, model_id: str) -> str:
        """Earlier versions' delay queue of a model's checks (per-message TTLs), deleted with the namespace."""
        return f"{self.namespace}.expiry.{model_id}"

    @property
    def webhooks_queue(self) -> str:
        return f"{self.namespace}.webhooks"

    def webhook_wait_queue(self, pause_s: int) -> str:
        return f"{self.namespace}.webhooks.wait.{pause_s}s"

    @property
    def downloads_queue(self) -> str:
        return f"{self.namespace}.downloads"

    @staticmethod
    def job_key(model_id: str, priority: Priority = "normal") -> str:
        """The routing key of a model's jobs at a priority (model ids contain no ".")."""
        return model_id if priority == "normal" else f"{model_id}.{priority}"

    def job_queue(self, model_id: str, priority: Priority = "normal") -> str:
        return f"{self.namespace}.jobs.{self.job_key(model_id, priority)}"

    def workers_queue(self, model_id: str) -> str:
        return f"{self.namespace}.workers.{model_id}"

    def queue_for(self, routing_key: str) -> str:
        return self.downloads_queue if routing_key == DOWNLOAD_KEY else f"{self.namespace}.jobs.{routing_key}"

    def queue_names(self, model_ids: list[str]) -> list[str]:
        """Every queue of the namespace (for tools that clean one up)."""
        names = [
            self.dead_letter_queue,
            self.dead_letter_notify_queue,
            self.expiry_due,
            self.webhooks_queue,
            self.downloads_queue,
            self.earlier_expiry_queue(DOWNLOAD_KEY),
            *(self.webhook_wait_queue(pause) for pause in WEBHOOK_PAUSES_S),
            *(self.expiry_wait_queue(step) for step in EXPIRY_STEPS_S),
        ]
        for model_id in model_ids:
            names += [self.job_queue(model_id, p) for p in PRIORITIES]
            names += [self.earlier_expiry_queue(model_id), self.workers_queue(model_id)]
        return names

    def exchange_names(self) -> list[str]:
        return [
            self.jobs_exchange,
            self.events_exchange,
            self.dead_letter_exchange,
            self.control_exchange,
            self.expiry_due,
        ]

    @staticmethod
    def event_key(job_id: str, status: str) -> str:
        return f"job.{job_id}.{status}"

    @staticmethod
    def dropped_key(job_id: str) -> str:
        """Routing key of a JobDropped notice on the events exchange (not matched by `job.#`)."""
        return f"dropped.{job_id}"

    async def declare_control(self, channel: AbstractChannel) -> AbstractExchange:
        return await channel.declare_exchange(self.control_exchange, aio_pika.ExchangeType.FANOUT, durable=True)

    async def declare_events(self, channel: AbstractChannel) -> AbstractExchange:
        return await channel.declare_exchange(self.events_exchange, aio_pika.ExchangeType.TOPIC, durable=True)

    async def declare_expiry(self, channel: AbstractChannel) -> None:
        """The expiry checks' delay queues (declared by gateways, which publish the checks) and the
        exchange and queue they reach when due."""
        due = await channel.declare_exchange(self.expiry_due, aio_pika.ExchangeType.FANOUT, durable=True)
        due_queue = await channel.declare_queue(self.expiry_due, durable=True, arguments={"x-queue-type": "quorum"})
        await due_queue.bind(due)
        for step in EXPIRY_STEPS_S:
            await channel.declare_queue(
                self.expiry_wait_queue(step),
                durable=True,
                arguments={
                    "x-queue-type": "quorum",
                    "x-message-ttl": step * 1000,
                    "x-dead-letter-exchange": self.expiry_due,
                    # At least once: a check lost on its way would leave its job queued for ever.
                    "x-dead-letter-strategy": "at-least-once",
                    "x-overflow": "reject-publish",
                },
            )

    async def declare_jobs(
        self, channel: AbstractChannel, model_ids: list[str]
    ) -> tuple[AbstractExchange, dict[str, AbstractQueue]]:
        """Declare the jobs exchange, the dead-letter path, the downloads queue and one queue per model.

        Returns the queues by routing key (`job_key(model, priority)`, or DOWNLOAD_KEY), and each
        model's presence queue by its name (`workers_queue(model)`).
        """
        dlx = await channel.declare_exchange(self.dead_letter_exchange, aio_pika.ExchangeType.FANOUT, durable=True)
        for name in (self.dead_letter_queue, self.dead_letter_notify_queue):
            dead = await channel.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})
            await dead.bind(dlx)
        queues = {}
        for model_id in model_ids:
            presence = self.workers_queue(model_id)
            queues[presence] = await channel.declare_queue(presence, durable=True, arguments={"x-queue-type": "quorum"})
        jobs = await channel.declare_exchange(self.jobs_exchange, aio_pika.ExchangeType.DIRECT, durable=True)
        keys = [self.job_key(model_id, p) for model_id in model_ids for p in PRIORITIES]
        for key in [*keys, DOWNLOAD_KEY]:
            queue = await channel.declare_queue(
                self.queue_for(key),
                durable=True,
                arguments={
                    "x-queue-type": "quorum",
                    "x-delivery-limit": DELIVERY_LIMIT,
                    "x-dead-letter-exchange": self.dead_letter_exchange,
                },
            )
            await queue.bind(jobs, routing_key=key)
            queues[key] = queue
        return jobs, queues


def to_amqp(envelope: EnvelopeHeader, persistent: bool = False, expiration: int | None = None) -> aio_pika.Message:
    """An envelope as an AMQP message: JSON body, its type and id as message properties."""
    return aio_pika.Message(
        encode(envelope),
        content_type="application/json",
        type=getattr(envelope, "type", None),
        message_id=envelope.message_id,
        expiration=expiration,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT if persistent else aio_pika.DeliveryMode.NOT_PERSISTENT,
    )


class BrokerUnreachable(Exception):
    """RabbitMQ did not take a connection within the time a process gives it at start. (Not an
    OSError, which the processes take for a port they cannot listen on.)"""


def shown_url(url: str) -> str:
    """An AMQP URL as logs and messages show it: without its password."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)))


async def connect(url: str, timeout: float = 30.0) -> AbstractRobustConnection:
    """Open a robust (self-reconnecting) connection, retrying until `timeout`: the broker may be
    starting. BrokerUnreachable after that."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            return await aio_pika.connect_robust(url)
        except (ConnectionError, OSError, aio_pika.exceptions.AMQPConnectionError) as exc:
            if loop.time() > deadline:
                raise BrokerUnreachable(
                    f"RabbitMQ at {shown_url(url)} did not take a connection within {timeout:g} s ({exc})"
                ) from exc
            log.warning("broker_unreachable", error=str(exc))
            await asyncio.sleep(1.0)
