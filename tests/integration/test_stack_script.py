"""`scripts/stack down --delete-namespace` against the real broker."""

from __future__ import annotations

import asyncio
import uuid

import aio_pika
import pytest
from aio_pika.exceptions import ChannelNotFoundEntity

from common.topology import Topology
from schemas.registry import load_registry
from scripts import devstack


async def exists(connection: aio_pika.abc.AbstractConnection, kind: str, name: str) -> bool:
    channel = await connection.channel()  # a failed passive declare closes its channel
    try:
        if kind == "queue":
            await channel.declare_queue(name, passive=True)
        else:
            await channel.get_exchange(name, ensure=True)
        return True
    except ChannelNotFoundEntity:
        return False


async def test_down_with_delete_namespace_removes_the_stacks_queues_and_exchanges(
    amqp_url, tmp_path, monkeypatch
) -> None:
    namespace = f"stack-down-{uuid.uuid4().hex[:8]}"
    topology = Topology(namespace)
    queues, exchanges = topology.queue_names(sorted(load_registry().models)), topology.exchange_names()
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        for name in queues:
            queue = await channel.declare_queue(name, durable=True)
        await channel.default_exchange.publish(aio_pika.Message(b"a job left behind"), routing_key=queue.name)
        for name in exchanges:
            await channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True)
        assert await exists(connection, "queue", queues[-1])

        monkeypatch.setattr(devstack, "STATE_DIR", tmp_path)
        monkeypatch.setenv("VIDEOGEN_AMQP_URL", amqp_url)
        devstack.StackState(namespace=namespace).save()  # a stack whose parts are all stopped
        assert await asyncio.to_thread(devstack.stack_down, True) == 0

        assert [name for name in queues if await exists(connection, "queue", name)] == []
        assert [name for name in exchanges if await exists(connection, "exchange", name)] == []


def test_delete_namespace_is_only_for_down(monkeypatch, capsys) -> None:
    monkeypatch.setattr("sys.argv", ["scripts/stack", "status", "--delete-namespace"])
    with pytest.raises(SystemExit):
        devstack.main()
    assert "--delete-namespace is for down" in capsys.readouterr().err


def test_down_with_delete_namespace_and_no_broker_still_stops_the_stack_and_says_so(
    tmp_path, monkeypatch, capsys
) -> None:
    stopped = []
    monkeypatch.setattr(devstack, "STATE_DIR", tmp_path)
    monkeypatch.setenv("VIDEOGEN_AMQP_URL", "amqp://guest:guest@127.0.0.1:1/")  # nothing listens there
    monkeypatch.setattr(devstack, "stop_pid", stopped.append)
    devstack.StackState(started={"gateway": {"pid": 11}, "s3": {"pid": 12}}).save()
    assert devstack.stack_down(True) == 1
    assert stopped == [11, 12] and devstack.StackState.load().started == {}
    assert "the namespace was not deleted" in capsys.readouterr().err
