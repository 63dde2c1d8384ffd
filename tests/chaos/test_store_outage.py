"""The object store (a SeaweedFS of this test's own) goes away mid-job and comes back."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from scripts import devstack
from tests.chaos.test_recovery import SLOW
from tests.helpers import client, fetch_link, get_json, submit, until


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
    env = {
        "VIDEOGEN_BROKER_NAMESPACE": ns,
        "VIDEOGEN_S3_ENDPOINT": store.endpoint,
        "VIDEOGEN_S3_ACCESS_KEY": store.access_key,
        "VIDEOGEN_S3_SECRET_KEY": store.secret_key,
        "VIDEOGEN_S3_BUCKET": store.bucket,
        "VIDEOGEN_S3_PUBLIC_ENDPOINT": f"http://{store.endpoint}",
    }
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
