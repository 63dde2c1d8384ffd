"""The object store (a SeaweedFS of this test's own) goes away mid-job and comes back, or hangs."""

from __future__ import annotations

import signal
import tempfile
from pathlib import Path

import aiohttp
import pytest

from scripts import devstack
from tests.chaos.test_recovery import SLOW
from tests.helpers import client, fetch_link, get_json, submit, until


def store_env(ns: str, store: devstack.S3Store) -> dict[str, str]:
    """The settings of services in namespace `ns` that use this test's own store."""
    return {
        "VIDEOGEN_BROKER_NAMESPACE": ns,
        "VIDEOGEN_S3_ENDPOINT": store.endpoint,
        "VIDEOGEN_S3_ACCESS_KEY": store.access_key,
        "VIDEOGEN_S3_SECRET_KEY": store.secret_key,
        "VIDEOGEN_S3_BUCKET": store.bucket,
    }


@pytest.fixture
async def http():
    async with client() as session:
        yield session


async def test_store_outage_mid_job_loses_nothing(stack, http, private_namespace, tally) -> None:
    ns, started = private_namespace
    data = Path(tempfile.mkdtemp(prefix="videogen-store-outage-"))
    base = devstack.free_port_block(10)

    def start_store():
        return devstack.start_weed(data, base + 6, base, "outage-key", "outage-secret-123", "outage")

    weed, store = start_store()
    env = store_env(ns, store) | {"VIDEOGEN_S3_PUBLIC_ENDPOINT": f"http://{store.endpoint}"}
    gateway, gw = stack.start_gateway(f"gateway-{ns}", **env)
    worker_log = stack.logs / f"worker-outage-{ns}.log"
    _, worker = stack.start_worker(f"worker-outage-{ns}", ["ltx-slow"], **env)
    started += [worker, gw]
    try:
        accepted = await submit(http, gateway, SLOW | {"num_inference_steps": 30})
        job_id = accepted["job_id"]

        async def denoising() -> bool:
            return ((await get_json(http, f"{gateway}/api/v1/jobs/{job_id}"))[1].get("step") or 0) >= 3

        await until(denoising, 60, "job denoising")
        devstack.stop_pid(weed.pid)

        async def worker_waiting() -> bool:  # the event: the worker noticed and is retrying
            return "store_retry" in worker_log.read_text(errors="replace")

        await until(worker_waiting, 60, "worker retrying the store")
        status, _ = await get_json(http, f"{gateway}/ready")
        assert status == 503
        weed, _ = start_store()

        async def ended() -> bool:
            status, job = await get_json(http, f"{gateway}/api/v1/jobs/{job_id}")
            return status == 200 and job["status"] in ("succeeded", "failed", "cancelled")

        await until(ended, 120, "job ended")
        _, job = await get_json(http, f"{gateway}/api/v1/jobs/{job_id}")
        assert job["status"] == "succeeded" and job["attempts"] == 1, "waited out, never handed back"
        status, video = await fetch_link(job["result"]["url"])
        assert status == 200 and len(video) == job["result"]["bytes"]
        tally.count(job["status"], 1, 1)
    finally:
        devstack.stop_pid(weed.pid)


async def test_a_store_that_hangs_gets_a_prompt_503(stack, http, private_namespace) -> None:
    """The store accepts connections but answers nothing (its process is stopped): the gateway's
    calls give up after VIDEOGEN_S3_TIMEOUT_S and the client gets 503 store_unavailable, not a
    wait of minutes; once the store answers again, so does the gateway."""
    ns, started = private_namespace
    data = Path(tempfile.mkdtemp(prefix="videogen-store-hang-"))
    base = devstack.free_port_block(10)
    weed, store = devstack.start_weed(data, base + 6, base, "hang-key", "hang-secret-1234", "hang")
    env = store_env(ns, store) | {"VIDEOGEN_S3_TIMEOUT_S": "2"}
    gateway, gw = stack.start_gateway(f"gateway-hang-{ns}", **env)
    started.append(gw)
    try:
        accepted = await submit(http, gateway, {"prompt": "before the hang"})
        job = f"{gateway}/api/v1/jobs/{accepted['job_id']}"
        weed.send_signal(signal.SIGSTOP)
        try:
            # Well under one of the old client's 60-second reads.
            timeout = aiohttp.ClientTimeout(total=20)
            async with http.get(job, timeout=timeout) as response:
                body = await response.json()
            assert response.status == 503 and body["error"]["code"] == "store_unavailable", body
            assert response.headers["Retry-After"] == "5"
            async with http.post(
                f"{gateway}/api/v1/generate/text-to-video", json={"prompt": "during the hang"}, timeout=timeout
            ) as response:
                assert response.status == 503 and (await response.json())["error"]["code"] == "store_unavailable"
        finally:
            weed.send_signal(signal.SIGCONT)
        status, found = await get_json(http, job)
        assert status == 200 and found["job_id"] == accepted["job_id"]
    finally:
        devstack.stop_pid(weed.pid)
