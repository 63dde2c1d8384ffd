"""Names and declarations of every exchange and queue. Both processes declare through here.

- `<ns>.jobs`   direct exchange; routing key = model id; one durable quorum queue per model,
                `<ns>.jobs.<model>`. Messages: persistent `JobMessage`.
- `<ns>.events` topic exchange; routing key `job.<job_id>.<status>`. Messages: `JobEvent`.
- `<ns>.dlx`    fanout exchange for dead letters, bound to the queue `<ns>.dead`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aio_pika
import structlog
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue, AbstractRobustConnection

log = structlog.get_logger("broker")

# A message that has been delivered this many times without an ack goes to the dead-letter queue.
DELIVERY_LIMIT = 5


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
    def dead_letter_exchange(self) -> str:
        return f"{self.namespace}.dlx"

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.namespace}.dead"

    def job_queue(self, model_id: str) -> str:
        return f"{self.namespace}.jobs.{model_id}"

    @staticmethod
    def event_key(job_id: str, status: str) -> str:
        return f"job.{job_id}.{status}"

    async def declare_events(self, channel: AbstractChannel) -> AbstractExchange:
        return await channel.declare_exchange(self.events_exchange, aio_pika.ExchangeType.TOPIC, durable=True)

    async def declare_jobs(self, channel: AbstractChannel, model_ids: list[str]) -> tuple[AbstractExchange, dict[str, AbstractQueue]]:
        """Declare the jobs exchange, the dead-letter path and one queue per model."""
        dlx = await channel.declare_exchange(self.dead_letter_exchange, aio_pika.ExchangeType.FANOUT, durable=True)
        dead = await channel.declare_queue(self.dead_letter_queue, durable=True,
                                           arguments={"x-queue-type": "quorum"})
        await dead.bind(dlx)
        jobs = await channel.declare_exchange(self.jobs_exchange, aio_pika.ExchangeType.DIRECT, durable=True)
        queues = {}
        for model_id in model_ids:
            queue = await channel.declare_queue(self.job_queue(model_id), durable=True, arguments={
                "x-queue-type": "quorum",
                "x-delivery-limit": DELIVERY_LIMIT,
                "x-dead-letter-exchange": self.dead_letter_exchange,
            })
            await queue.bind(jobs, routing_key=model_id)
            queues[model_id] = queue
        return jobs, queues


async def connect(url: str, timeout: float = 30.0) -> AbstractRobustConnection:
    """Open a robust (self-reconnecting) connection, retrying until `timeout`: the broker may be starting."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            return await aio_pika.connect_robust(url)
        except (ConnectionError, OSError, aio_pika.exceptions.AMQPConnectionError) as exc:
            if loop.time() > deadline:
                raise
            log.warning("broker_unreachable", error=str(exc))
            await asyncio.sleep(1.0)
