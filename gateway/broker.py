"""The gateway's side of RabbitMQ: publish jobs with confirms, receive every job event."""

from __future__ import annotations

import aio_pika
import structlog
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage, AbstractRobustConnection

from common.topology import Topology, connect
from gateway.events import EventHub
from schemas.messages import DecodeError, JobEvent, JobMessage, decode, encode

log = structlog.get_logger("gateway.broker")


class GatewayBroker:
    def __init__(self, amqp_url: str, topology: Topology, hub: EventHub) -> None:
        self._url = amqp_url
        self._topology = topology
        self._hub = hub
        self._connection: AbstractRobustConnection | None = None
        self._jobs: AbstractExchange | None = None
        self._events: AbstractExchange | None = None

    async def start(self, model_ids: list[str], connect_timeout: float = 30.0) -> None:
        self._connection = await connect(self._url, connect_timeout)
        # Publisher confirms: a publish returns only once the broker has the message.
        channel = await self._connection.channel(publisher_confirms=True)
        # Declaring every model's queue here means a job accepted before any worker
        # started is stored, not dropped by an exchange with no bound queue.
        self._jobs, _ = await self._topology.declare_jobs(channel, model_ids)
        self._events = await self._topology.declare_events(channel)

        # Each gateway has its own exclusive queue on the events exchange, so every
        # gateway sees every event of every job.
        consume_channel = await self._connection.channel()
        queue = await consume_channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(self._topology.events_exchange, routing_key="job.#")
        await queue.consume(self._on_event, no_ack=True)

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()

    @property
    def connected(self) -> bool:
        return self._connection is not None and not self._connection.is_closed and self._connection.connected.is_set()

    async def publish_job(self, message: JobMessage) -> None:
        assert self._jobs is not None
        await self._jobs.publish(
            aio_pika.Message(encode(message), content_type="application/json", type=message.type,
                             message_id=message.message_id, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=message.params.model,
            mandatory=True,
        )

    async def publish_event(self, event: JobEvent) -> None:
        assert self._events is not None
        await self._events.publish(
            aio_pika.Message(encode(event), content_type="application/json", type=event.type,
                             message_id=event.message_id),
            routing_key=Topology.event_key(event.job_id, event.status),
        )

    async def _on_event(self, message: AbstractIncomingMessage) -> None:
        try:
            event = decode(message.body)
        except DecodeError as exc:
            log.warning("bad_event", reason=exc.reason)
            return
        if isinstance(event, JobEvent):
            self._hub.publish(event)

