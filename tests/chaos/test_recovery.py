"""Faults caused for real: a worker killed mid-job, a job older than its queue limit."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import pytest

from tests.conftest import EXTRA_MODELS
from tests.helpers import client, get_json, object_names, submit, until_step, watch

SLOW = {"prompt": "recover", "model": "ltx-slow", "width": 256, "height": 256, "num_frames": 65}


@pytest.fixture
async def http():
    async with client() as session:
        yield session


async def test_worker_killed_mid_job_the_job_finishes_on_another_worker(stack, http, tally) -> None:
    # A queue limit far shorter than the job: the handed-back job must still run, not expire.
    short = json.dumps({"ltx-slow": EXTRA_MODELS["ltx-slow"] | {"max_queue_s": 2}})
    gateway, _ = stack.start_gateway("gateway-recovery", VIDEOGEN_MODEL_OVERRIDES=short)
    stack.start_worker("worker-slow-2", ["ltx-slow"])
    accepted = await submit(http, gateway, SLOW | {"num_inference_steps": 40})
    job_id = accepted["job_id"]

    frames: list[dict] = []
    async with http.ws_connect(f"{gateway}/api/v1/ws", params={"job_id": job_id}) as ws:
        async for msg in ws:
            frames.append(msg.json())
            if frames[-1].get("step") == 3:
                break
    status, job = await get_json(http, f"{gateway}/api/v1/jobs/{job_id}")
    first_worker = job["worker"]
    os.kill(stack.workers[first_worker].pid, signal.SIGKILL)

    rest = await watch(http, gateway, job_id, since=str(frames[-1]["seq"]), timeout=120)
    final = rest[-1]["job"]
    assert final["status"] == "succeeded", final["error"]
    status, record = await get_json(http, f"{gateway}/api/v1/jobs/{job_id}")
    assert record["worker"] != first_worker and record["attempts"] == 2
    seqs = [f["seq"] for f in frames + rest]
    assert seqs == list(range(len(seqs))), "one unbroken event sequence across both workers"
    assert sum(f["status"] == "succeeded" for f in frames + rest) == 1
    assert [f["progress"] for f in frames + rest] == sorted(f["progress"] for f in frames + rest)
    # The second attempt's video, under its own key; the killed run never uploaded.
    assert _objects(stack, job_id) == {f"jobs/{job_id}/job.json", f"jobs/{job_id}/video-2.mp4"}
    tally.count(record["status"], _videos(stack, job_id), sum(f["status"] == "succeeded" for f in frames + rest))
    assert tally.lost == tally.duplicated == 0


async def test_a_running_job_is_not_expired(stack, http, tally) -> None:
    short = json.dumps({"ltx-slow": EXTRA_MODELS["ltx-slow"] | {"max_queue_s": 1}})
    gateway, _ = stack.start_gateway("gateway-short-limit", VIDEOGEN_MODEL_OVERRIDES=short)
    accepted = await submit(http, gateway, SLOW | {"num_inference_steps": 25})
    frames = await watch(http, gateway, accepted["job_id"], timeout=120)
    assert frames[-1]["status"] == "succeeded"
    tally.count(
        frames[-1]["status"],
        _videos(stack, accepted["job_id"]),
        sum(f["job"] is not None for f in frames if "job" in f),
    )


def _videos(stack, job_id: str) -> int:
    return sum(key.endswith(".mp4") for key in _objects(stack, job_id) if "/input/" not in key)


def _objects(stack, job_id: str) -> set[str]:
    return object_names(stack, f"jobs/{job_id}/")


async def _wait_exit(proc, timeout: float) -> int:
    import asyncio

    return await asyncio.wait_for(asyncio.to_thread(proc.wait), timeout)


async def test_sigterm_lets_the_current_job_finish_then_exits_0(stack, http, private_namespace, tally) -> None:
    ns, started = private_namespace
    gateway, gw = stack.start_gateway(f"gateway-{ns}", VIDEOGEN_BROKER_NAMESPACE=ns)
    _, worker = stack.start_worker(
        f"worker-term-{ns}", ["ltx-slow"], VIDEOGEN_BROKER_NAMESPACE=ns, VIDEOGEN_SHUTDOWN_GRACE_S="60"
    )
    started += [worker, gw]
    accepted = await submit(http, gateway, SLOW | {"num_inference_steps": 20})
    await until_step(http, gateway, accepted["job_id"], 2)
    worker.send_signal(signal.SIGTERM)
    frames = await watch(http, gateway, accepted["job_id"], timeout=120)
    assert frames[-1]["status"] == "succeeded" and frames[-1]["job"]["attempts"] == 1
    assert await _wait_exit(worker, 30) == 0
    tally.count(frames[-1]["status"], _videos(stack, accepted["job_id"]), 1)


async def test_sigterm_past_the_grace_hands_the_job_back_and_exits_0(stack, http, private_namespace, tally) -> None:
    ns, started = private_namespace
    gateway, gw = stack.start_gateway(f"gateway-{ns}", VIDEOGEN_BROKER_NAMESPACE=ns)
    _, first = stack.start_worker(
        f"worker-short-{ns}", ["ltx-slow"], VIDEOGEN_BROKER_NAMESPACE=ns, VIDEOGEN_SHUTDOWN_GRACE_S="0.5"
    )
    started += [first, gw]
    accepted = await submit(http, gateway, SLOW | {"num_inference_steps": 40})
    await until_step(http, gateway, accepted["job_id"], 2)
    # The next worker starts meanwhile; the job is the first one's until it hands it back.
    starting = asyncio.create_task(
        asyncio.to_thread(stack.start_worker, f"worker-next-{ns}", ["ltx-slow"], VIDEOGEN_BROKER_NAMESPACE=ns)
    )
    first.send_signal(signal.SIGTERM)
    assert await _wait_exit(first, 20) == 0, "exits well before the 40-step job could have finished"
    status, job = await get_json(http, f"{gateway}/api/v1/jobs/{accepted['job_id']}")
    assert job["status"] == "running" and job["step"] < 40
    _, second = await starting
    started.append(second)
    frames = await watch(http, gateway, accepted["job_id"], timeout=180)
    assert frames[-1]["status"] == "succeeded" and frames[-1]["job"]["attempts"] == 2
    tally.count(
        frames[-1]["status"], _videos(stack, accepted["job_id"]), sum(f["status"] == "succeeded" for f in frames)
    )
    assert tally.duplicated == 0


async def test_a_job_that_keeps_killing_workers_is_dead_lettered_and_failed(
    stack, http, private_namespace, amqp_url, tally
) -> None:
    """Each time a worker starts the job, the worker dies: after the queue's delivery limit the broker
    dead-letters it, a gateway fails the job with `worker_crashed`, and the message waits in <ns>.dead."""
    import asyncio

    import aio_pika

    from common.topology import DELIVERY_LIMIT

    ns, started = private_namespace
    gateway, gw = stack.start_gateway(f"gateway-{ns}", VIDEOGEN_BROKER_NAMESPACE=ns)
    started.append(gw)
    # A worker for every delivery the broker will make, started together (a worker's start is
    # most of a delivery's time); each delivery goes to one still alive, and that one is killed.
    names = [f"worker-doomed-{n}-{ns}" for n in range(DELIVERY_LIMIT + 1)]
    workers = await asyncio.gather(
        *(asyncio.to_thread(stack.start_worker, name, ["ltx-slow"], VIDEOGEN_BROKER_NAMESPACE=ns) for name in names)
    )
    procs = {name: proc for name, (_, proc) in zip(names, workers, strict=True)}
    started.extend(procs.values())
    accepted = await submit(http, gateway, SLOW | {"num_inference_steps": 40})
    job_id = accepted["job_id"]
    kills = 0
    for attempt in range(1, DELIVERY_LIMIT + 2):

        async def started_attempt(attempt: int = attempt) -> dict | None:
            _, now = await get_json(http, f"{gateway}/api/v1/jobs/{job_id}")
            return now if now["attempts"] >= attempt or now["status"] == "failed" else None

        deadline = asyncio.get_running_loop().time() + 60
        while (job := await started_attempt()) is None:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
        if job["status"] == "failed":
            break
        worker = procs.pop(job["worker"])
        os.kill(worker.pid, signal.SIGKILL)
        await _wait_exit(worker, 10)
        kills += 1

    async def failed() -> dict | None:
        _, now = await get_json(http, f"{gateway}/api/v1/jobs/{job_id}")
        return now if now["status"] == "failed" else None

    deadline = asyncio.get_running_loop().time() + 60
    while (job := await failed()) is None:
        assert asyncio.get_running_loop().time() < deadline, "the job was never failed"
        await asyncio.sleep(0.1)
    assert job["error"]["code"] == "worker_crashed" and kills >= DELIVERY_LIMIT
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        dead = await (await connection.channel()).declare_queue(f"{ns}.dead", passive=True)
        assert dead.declaration_result.message_count == 1, "kept for operators"
    tally.count(job["status"], _videos(stack, job_id), 1)
