"""RabbitMQ restarted (an isolated node of this test's own) while jobs are queued and running."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from scripts import devstack
from tests.chaos.test_recovery import SLOW, _videos
from tests.helpers import client, get_json, submit, until


@pytest.fixture
async def http():
    async with client() as session:
        yield session


@pytest.fixture
def private_broker():
    if shutil.which("rabbitmq-server") is None:
        pytest.fail("this test needs the rabbitmq-server package (it restarts a node of its own)")
    base = Path(tempfile.mkdtemp(prefix="videogen-rabbit-restart-"))
    url = f"amqp://guest:guest@127.0.0.1:{devstack.free_port_block(1)}/"
    node = devstack.start_rabbit_node(url, base)
    state = {"url": url, "node": node, "base": base}
    yield state
    devstack.stop_rabbit_node(state["node"])
    shutil.rmtree(base, ignore_errors=True)


async def test_broker_restart_loses_no_job(stack, http, private_broker, tally) -> None:
    # wan-tiny has no worker on this broker: its jobs expire after 2 s, which only a gateway's
    # expiry consumer can notice.
    overrides = json.loads(stack.env["VIDEOGEN_MODEL_OVERRIDES"]) | {"wan-tiny": {"max_queue_s": 2}}
    env = {"VIDEOGEN_AMQP_URL": private_broker["url"], "VIDEOGEN_MODEL_OVERRIDES": json.dumps(overrides)}
    gateway, gw = stack.start_gateway("gateway-restart-broker", **env)
    _, worker = stack.start_worker("worker-restart-broker", ["ltx-slow"], **env)
    jobs = [
        (await submit(http, gateway, SLOW | {"num_inference_steps": 12, "prompt": f"survive {n}"}))["job_id"]
        for n in range(3)
    ]

    async def running() -> bool:
        _, job = await get_json(http, f"{gateway}/api/v1/jobs/{jobs[0]}")
        return job["status"] == "running"

    await until(running, 60, "first job running")
    in_process = await _gateway_and_worker_connections(private_broker["url"])
    opened = _channels(in_process)
    devstack.stop_rabbit_node(private_broker["node"])
    await _channels_outlive_a_collection_while_reconnecting(in_process, opened)

    async def not_ready() -> bool:
        status, body = await get_json(http, f"{gateway}/ready")
        return status == 503 and body["broker"] == "unreachable"

    await until(not_ready, 30, "/ready 503 while the broker is down")
    async with http.post(f"{gateway}/api/v1/generate/text-to-video", json={"prompt": "during outage"}) as response:
        assert response.status == 503  # refused, not silently accepted

    # Same node, same data directory: durable queues and persistent messages come back.
    base = private_broker["base"]
    subprocess.run(
        ["rabbitmq-server", "-detached"], check=True, env=devstack.rabbit_node_env(private_broker["url"], base)
    )
    devstack.wait_until(lambda: devstack.amqp_answers(private_broker["url"]), 90, "RabbitMQ back")

    async def ready_again() -> bool:
        return (await get_json(http, f"{gateway}/ready"))[0] == 200

    await until(ready_again, 60, "gateway reconnected")

    async def all_done() -> bool:
        states = [(await get_json(http, f"{gateway}/api/v1/jobs/{j}"))[1]["status"] for j in jobs]
        return all(s in ("succeeded", "failed", "cancelled") for s in states)

    await until(all_done, 180, "every accepted job ended")

    # Consumers the processes had before the outage are back too: the worker's presence (the
    # gateway counts it again) and the gateway's expiry checks (a job no worker takes expires).
    async def worker_counted() -> bool:
        return (await get_json(http, f"{gateway}/api/v1/model/info?model=ltx-slow"))[1]["workers"] == 1

    await until(worker_counted, 30, "the worker counted again after the restart")
    lonely = (await submit(http, gateway, {"prompt": "nobody takes me", "model": "wan-tiny"}))["job_id"]

    async def expired() -> bool:
        job = (await get_json(http, f"{gateway}/api/v1/jobs/{lonely}"))[1]
        return job["status"] == "failed" and job["error"]["code"] == "expired"

    await until(expired, 60, "the expiry check consumed after the restart")
    for job_id in jobs:
        _, job = await get_json(http, f"{gateway}/api/v1/jobs/{job_id}")
        tally.count(job["status"], _videos(stack, job_id), 1)
        assert job["status"] == "succeeded", job["error"]
    assert tally.lost == tally.duplicated == 0
    for close in in_process[2:]:
        await close()


async def _gateway_and_worker_connections(url: str) -> list:
    """A gateway's broker and a worker in this process: [their two connections, their closers]."""
    import uuid

    from common.settings import WorkerSettings
    from common.topology import Topology
    from gateway.broker import GatewayBroker
    from gateway.events import EventHub
    from worker.worker import Worker

    async def nothing(*args):
        return None

    namespace = f"gc-{uuid.uuid4().hex[:8]}"
    broker = GatewayBroker(url, Topology(namespace), EventHub())
    await broker.start(["ltx-tiny"], on_dead_letter=nothing, on_expiry=nothing)
    worker = Worker(WorkerSettings(broker_namespace=namespace, amqp_url=url), None, {}, None)  # type: ignore[arg-type]
    await worker.start()
    return [broker.connection, worker._connection, broker.close, lambda: worker.stop(0)]


def _channels(in_process: list) -> list[int]:
    return [len(connection._RobustConnection__channels) for connection in in_process[:2]]


async def _channels_outlive_a_collection_while_reconnecting(in_process: list, opened: list[int]) -> None:
    """The robust connection holds its channels weakly, and while it reconnects the connection
    under it is gone: a channel its owner held no reference to could be collected then, and come
    back without its queue and consumers (a gateway's events, expiry checks and dead letters; a
    worker's cancels). The gateway and the worker hold every channel they open."""
    import gc

    assert opened == [4, 5]  # confirmed, notices, events, dead letters; events, control, downloads, 2 lanes
    deadline = asyncio.get_running_loop().time() + 60
    while any(connection.transport is not None for connection in in_process[:2]):
        assert asyncio.get_running_loop().time() < deadline, "the connections never noticed the broker left"
        await asyncio.sleep(0.1)
    gc.collect()
    assert _channels(in_process) == opened
