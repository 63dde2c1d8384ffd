"""`scripts/stack down --delete-namespace` against the real broker, and a real gateway that fails to start."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
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
    amqp_url, tmp_path, monkeypatch, capsys
) -> None:
    """The queues of the registry's models, and those of a model a process with other registry
    settings declared (found with rabbitmqctl), but not those of a namespace whose name starts
    with this one's."""
    namespace = f"stack-down-{uuid.uuid4().hex[:8]}"
    topology = Topology(namespace)
    extra = topology.queue_names(["model-from-overrides"])[-5:]  # its job, expiry and presence queues
    queues = [*topology.queue_names(sorted(load_registry().models)), *extra]
    exchanges = topology.exchange_names()
    neighbour = Topology(f"{namespace}.jobs").queue_names(["x"])[-5:]  # "<ns>.jobs.jobs.x": not ours
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        for name in neighbour:
            await channel.declare_queue(name)
        for name in queues:
            queue = await channel.declare_queue(name, durable=True)
        await channel.default_exchange.publish(aio_pika.Message(b"a job left behind"), routing_key=queue.name)
        for name in exchanges:
            await channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True)
        assert await exists(connection, "queue", queues[-1])

        monkeypatch.setattr(devstack, "STATE_DIR", tmp_path)
        # The broker is the one `up` recorded, whatever the shell that runs `down` says.
        monkeypatch.setenv("VIDEOGEN_AMQP_URL", "amqp://guest:guest@127.0.0.1:1/")
        devstack.StackState(namespace=namespace, amqp_url=amqp_url).save()  # a stack whose parts are all stopped
        assert await asyncio.to_thread(devstack.stack_down, True) == 0

        assert [name for name in queues if await exists(connection, "queue", name)] == []
        assert [name for name in exchanges if await exists(connection, "exchange", name)] == []
        assert [name for name in neighbour if await exists(connection, "queue", name)] == neighbour
        channel = await connection.channel()
        for name in neighbour:
            await channel.queue_delete(name)
        assert f"with the queues of models outside this registry: {', '.join(sorted(extra))}" in capsys.readouterr().out


def test_delete_namespace_is_only_for_down(monkeypatch, capsys) -> None:
    monkeypatch.setattr("sys.argv", ["scripts/stack", "status", "--delete-namespace"])
    with pytest.raises(SystemExit):
        devstack.main()
    assert "--delete-namespace is for down" in capsys.readouterr().err


def test_down_with_delete_namespace_and_no_broker_still_stops_the_stack_and_says_so(
    tmp_path, monkeypatch, capsys
) -> None:
    monkeypatch.setattr(devstack, "STATE_DIR", tmp_path)
    monkeypatch.setenv("VIDEOGEN_AMQP_URL", "amqp://guest:guest@127.0.0.1:1/")  # nothing listens there
    procs = [subprocess.Popen(["sleep", "120"]) for _ in range(2)]
    try:
        started = {name: devstack.process_identity(p.pid) for name, p in zip(["gateway", "s3"], procs, strict=True)}
        devstack.StackState(started=started).save()
        assert devstack.stack_down(True) == 1
        assert [devstack.process_start(p.pid) for p in procs] == [None, None]  # stopped and reaped
        assert devstack.StackState.load().started == {}
        assert "the namespace was not deleted" in capsys.readouterr().err
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_a_gateway_that_fails_to_start_is_stopped_and_named_with_what_it_logged_this_time(tmp_path) -> None:
    """A real gateway that exits at start (its key file is missing): the error names the part, its
    exit status and the last line its log got from this start, not the earlier lines of the log."""
    log = tmp_path / "gateway.log"
    log.write_text("a line from an earlier start\n")
    store = devstack.S3Store("127.0.0.1:1", "key", "secret-key-123", "bucket")
    env = devstack.service_env(
        store, "amqp://guest:guest@127.0.0.1:1/", "unused", tmp_path, VIDEOGEN_API_KEYS_FILE=str(tmp_path / "none")
    )
    spawned = []
    with pytest.raises(devstack.StartFailed) as failed:
        devstack.start_gateway(env, devstack.free_port_block(1), log, on_spawn=spawned.append)
    summary = failed.value.summary()
    assert summary.startswith("gateway: process exited with 2; its log's last line: videogen-gateway: ")
    assert str(tmp_path / "none") in summary and summary.endswith(f"(log: {log})")
    assert "earlier start" not in str(failed.value)
    assert spawned[0].poll() == 2
    with pytest.raises(ProcessLookupError):
        os.kill(spawned[0].pid, 0)  # reaped
    assert sys.executable in spawned[0].args
