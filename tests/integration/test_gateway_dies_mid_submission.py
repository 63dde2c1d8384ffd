"""A gateway that dies after storing a job's record but before publishing the job leaves a record
that says `queued` for a job no worker will receive. Its expiry check went out with the record,
so the job still ends (`failed`, `expired`) when the check falls due.

The gateway runs in this process, on the real broker and store, with the job publish held
forever: from the broker's and the store's side, the same as a gateway that died there."""

from __future__ import annotations

import asyncio
import json
import uuid

from aiohttp.test_utils import TestClient, TestServer

from common.settings import GatewaySettings
from common.store import ObjectStore, job_id_of_index
from gateway.app import create_app
from gateway.broker import GatewayBroker
from schemas.jobs import JobStatus
from scripts import devstack
from tests.conftest import delete_test_namespace
from tests.helpers import until


async def test_a_job_stored_but_never_published_ends_expired(s3_store, amqp_url, tmp_path, monkeypatch) -> None:
    ns = f"test-dies-{uuid.uuid4().hex[:8]}"
    bucket = f"dies-{uuid.uuid4().hex[:8]}"
    env = devstack.service_env(
        s3_store,
        amqp_url,
        ns,
        tmp_path,
        VIDEOGEN_S3_BUCKET=bucket,
        VIDEOGEN_AUTH_DISABLED="true",
        VIDEOGEN_REQUEST_TIMEOUT_S="1",
        VIDEOGEN_MODEL_OVERRIDES=json.dumps({"ltx-tiny": {"max_queue_s": 1}}),
    )
    for name, value in env.items():
        if name.startswith("VIDEOGEN_"):
            monkeypatch.setenv(name, value)
    settings = GatewaySettings()
    never, reached = asyncio.Event(), asyncio.Event()

    async def dies_here(*args, **kwargs) -> None:
        reached.set()
        await never.wait()
        raise ConnectionError("the gateway died before the job was published")

    monkeypatch.setattr(GatewayBroker, "publish_job", dies_here)
    store = ObjectStore(settings)
    try:
        async with TestClient(TestServer(create_app(settings))) as client:
            response = await client.post(
                "/api/v1/generate/text-to-video", json={"prompt": "never published", "model": "ltx-tiny"}
            )
            assert response.status == 504 and reached.is_set()
            keys = await store.list_keys("index/jobs/", None, 10)
            assert len(keys) == 1
            job_id = job_id_of_index(keys[0])

            async def ended() -> bool:
                record = await store.get_record(job_id)
                return record is not None and record.status.is_terminal

            await until(ended, 30, "the stored job to end")
            record = await store.get_record(job_id)
            assert record.status == JobStatus.FAILED and record.error.code == "expired"
            assert record.attempts == 0 and record.seq == 1
            never.set()  # let the held submission end before the app stops
    finally:
        await delete_test_namespace(amqp_url, ns)
