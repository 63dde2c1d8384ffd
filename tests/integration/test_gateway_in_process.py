"""A gateway in this process, on the real broker and store, with one step of a submission held
or raced: what a gateway that dies mid-submission, or two gateways that both lost their hold on
an Idempotency-Key, leave behind."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

import pytest
from aiohttp.test_utils import TestClient, TestServer

from common.settings import GatewaySettings
from common.store import ObjectStore, StoreUnanswered, index_key, job_id_of_index
from gateway import handlers, idempotency, openai_api
from gateway.app import create_app
from gateway.broker import GatewayBroker
from gateway.keys import HUB, UPLOAD_SLOTS
from schemas.jobs import JobStatus, utcnow
from scripts import devstack
from tests.conftest import delete_test_namespace
from tests.helpers import png_bytes, queued_record, until

pytestmark = pytest.mark.usefixtures("closed_stores")


@pytest.fixture
async def settings(s3_store, amqp_url, tmp_path, monkeypatch) -> AsyncIterator[GatewaySettings]:
    """Settings of a gateway with a broker namespace and a bucket of its own, and no API keys."""
    ns = f"test-inproc-{uuid.uuid4().hex[:8]}"
    env = devstack.service_env(
        s3_store,
        amqp_url,
        ns,
        tmp_path,
        VIDEOGEN_S3_BUCKET=f"inproc-{uuid.uuid4().hex[:8]}",
        VIDEOGEN_AUTH_DISABLED="true",
    )
    for name, value in env.items():
        if name.startswith("VIDEOGEN_"):
            monkeypatch.setenv(name, value)
    try:
        yield GatewaySettings()
    finally:
        await delete_test_namespace(amqp_url, ns)


async def stored_jobs(store: ObjectStore) -> list[str]:
    return [job_id_of_index(key) for key in await store.list_keys("index/jobs/", None, 10)]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/v1/generate/text-to-video", {"prompt": "never", "model": "ltx-tiny"}),
        ("/api/v1/models/download", {"model": "ltx-tiny"}),
    ],
    ids=["generation", "download"],
)
async def test_a_job_stored_but_never_published_ends_expired(settings, monkeypatch, path, body) -> None:
    """The gateway dies after storing the job's record, before publishing the job: its expiry check
    went out with the record, so the job still ends when the check falls due. A model download's
    check waits the gateway's download_max_queue_s."""
    never, reached = asyncio.Event(), asyncio.Event()

    async def dies_here(*args, **kwargs) -> None:
        reached.set()
        await never.wait()
        raise ConnectionError("the gateway died before the job was published")

    monkeypatch.setattr(GatewayBroker, "publish_job", dies_here)
    # The held submission gets its 504 after a second; its job expires two seconds after it was stored.
    settings = settings.model_copy(
        update={
            "request_timeout_s": 1.0,
            "model_overrides": {"ltx-tiny": {"max_queue_s": 2}},
            "download_max_queue_s": 2,
        }
    )
    store = ObjectStore(settings)
    async with TestClient(TestServer(create_app(settings))) as client:
        response = await client.post(path, json=body)
        assert response.status == 504 and reached.is_set()
        [job_id] = await stored_jobs(store)

        async def ended() -> bool:
            record = await store.get_record(job_id)
            return record is not None and record.status.is_terminal

        await until(ended, 30, "the stored job to end")
        record = await store.get_record(job_id)
        assert record.status == JobStatus.FAILED and record.error.code == "expired"
        assert record.attempts == 0 and record.seq == 1
        assert "(2 s)" in record.error.message
        assert ("download" in record.error.message) == (record.mode == "download")
        never.set()  # let the held submission end before the app stops


async def test_a_gateway_that_dies_before_the_expiry_check_is_confirmed_leaves_no_queued_record(
    settings, monkeypatch
) -> None:
    """Without a check on its way, a stored `queued` record would never end: it is written only
    once the check is confirmed (the index entry, written meanwhile, is skipped by listings)."""
    never, reached = asyncio.Event(), asyncio.Event()

    async def dies_here(*args, **kwargs) -> None:
        reached.set()
        await never.wait()

    monkeypatch.setattr(GatewayBroker, "publish_expiry_check", dies_here)
    settings = settings.model_copy(update={"request_timeout_s": 1.0})
    store = ObjectStore(settings)
    async with TestClient(TestServer(create_app(settings))) as client:
        response = await client.post("/api/v1/generate/text-to-video", json={"prompt": "never", "model": "ltx-tiny"})
        assert response.status == 504 and reached.is_set()
        [job_id] = await stored_jobs(store)
        assert await store.get_record(job_id) is None
        listing = await (await client.get("/api/v1/jobs")).json()
        assert listing["jobs"] == []
        never.set()


@pytest.mark.parametrize("broker_cancel", ["sent", "fails"])
async def test_two_first_uses_of_a_key_that_both_made_a_job_end_with_one(settings, monkeypatch, broker_cancel) -> None:
    """Neither submission held the key (as when a gateway's broker connection drops while it holds
    it): both look the key up, find nothing and queue a job. One remembers its job; the other
    finds the key taken, cancels its own job and answers with the first, even if the cancel to
    the workers cannot be sent; the duplicate's `queued` event is never published."""

    @asynccontextmanager
    async def not_held(request, key) -> AsyncIterator[None]:
        yield

    both_queued, arrived = asyncio.Event(), []
    remember = idempotency.remember

    async def remember_once_both_queued(*args, **kwargs) -> None:
        arrived.append(1)
        if len(arrived) == 2:
            both_queued.set()
        await both_queued.wait()
        await remember(*args, **kwargs)

    async def no_broker(self, job_id) -> None:
        raise ConnectionError("broker connection lost")

    published: list[tuple[str, str]] = []
    publish_event = GatewayBroker.publish_event

    async def recording(self, event) -> None:
        published.append((event.job_id, event.status))
        await publish_event(self, event)

    monkeypatch.setattr(GatewayBroker, "publish_event", recording)
    monkeypatch.setattr(idempotency, "claim", not_held)
    monkeypatch.setattr(idempotency, "remember", remember_once_both_queued)
    if broker_cancel == "fails":
        monkeypatch.setattr(GatewayBroker, "publish_cancel", no_broker)
    store = ObjectStore(settings)
    async with TestClient(TestServer(create_app(settings))) as client:

        async def submit():
            response = await client.post(
                "/api/v1/generate/text-to-video",
                json={"prompt": "once", "model": "ltx-tiny"},
                headers={"Idempotency-Key": "raced-key"},
            )
            return response.status, response.headers.get("Idempotent-Replayed"), await response.json()

        answers = await asyncio.gather(submit(), submit())
        assert [status for status, _, _ in answers] == [202, 202]
        assert answers[0][2]["job_id"] == answers[1][2]["job_id"], "both answers name the same job"
        assert sorted(str(replayed) for _, replayed, _ in answers) == ["None", "true"]
        jobs = await stored_jobs(store)
        statuses = {job_id: (await store.get_record(job_id)).status for job_id in jobs}
        kept = answers[0][2]["job_id"]
        assert len(jobs) == 2 and statuses.pop(kept) == JobStatus.QUEUED
        assert list(statuses.values()) == [JobStatus.CANCELLED], "the duplicate was cancelled"
        # Its `queued` event was held back until its key would have been remembered: no webhook
        # of the duplicate's (it ends without any); the kept job's went out.
        [duplicate] = statuses
        assert (kept, "queued") in published and (duplicate, "queued") not in published


@pytest.mark.parametrize("taken", [False, True])
async def test_a_publish_whose_confirm_is_lost_is_accepted_only_if_a_worker_took_the_job(
    settings, monkeypatch, taken
) -> None:
    """The broker gave no confirm for the job message: 503 and the job `failed` (`not_queued`), unless
    it reached the broker after all and a worker has started it: then it stands, and the answer is 202."""
    store = ObjectStore(settings)

    async def confirm_lost(self, message) -> None:
        if taken:  # a worker took the job from its queue and wrote `running`
            record = await store.get_record(message.job_id)
            await store.put_record(record.advance(status=JobStatus.RUNNING, attempts=1, worker="worker-x"))
        raise ConnectionError("connection lost before the confirm")

    monkeypatch.setattr(GatewayBroker, "publish_job", confirm_lost)
    async with TestClient(TestServer(create_app(settings))) as client:
        response = await client.post("/api/v1/generate/text-to-video", json={"prompt": "lost", "model": "ltx-tiny"})
        body = await response.json()
        [job_id] = await stored_jobs(store)
        record = await store.get_record(job_id)
    if taken:
        assert response.status == 202 and body["job_id"] == job_id
        assert record.status == JobStatus.RUNNING and record.worker == "worker-x"
    else:
        assert response.status == 503 and body["error"]["code"] == "broker_unavailable"
        assert record.status == JobStatus.FAILED and record.error.code == "not_queued"


async def test_a_cancel_leaves_a_job_a_worker_started_meanwhile_to_that_worker(settings, monkeypatch) -> None:
    """A worker writes `running` between the gateway's read of the queued record and its write of
    `cancelled`: the gateway's write is refused, it reads again, and answers 202 with the running job."""
    store = ObjectStore(settings)
    read = ObjectStore.get_record_tagged
    reads: list[str] = []

    async def read_then_a_worker_starts(self, job_id):
        found = await read(self, job_id)
        reads.append(found[0].status)
        if len(reads) == 2:  # the cancel's second read, for its conditional write
            await store.put_record(found[0].advance(status=JobStatus.RUNNING, attempts=1, worker="worker-x"))
        return found

    async with TestClient(TestServer(create_app(settings))) as client:
        response = await client.post("/api/v1/generate/text-to-video", json={"prompt": "race", "model": "ltx-tiny"})
        job_id = (await response.json())["job_id"]
        monkeypatch.setattr(ObjectStore, "get_record_tagged", read_then_a_worker_starts)
        response = await client.post(f"/api/v1/jobs/{job_id}/cancel")
        body = await response.json()
        record = await store.get_record(job_id)
    assert response.status == 202 and body["status"] == "running"
    assert reads[:3] == [JobStatus.QUEUED, JobStatus.QUEUED, JobStatus.RUNNING], "read, raced, read again"
    assert record.status == JobStatus.RUNNING and record.worker == "worker-x" and record.seq == 1


@pytest.mark.parametrize("started", [False, True])
async def test_a_cancel_without_the_broker_is_carried_by_the_record(settings, monkeypatch, started) -> None:
    """The broadcast to the workers cannot be sent: a queued job is cancelled all the same (200),
    and a running one is marked with the request (202), which its worker finds at its next write
    of the record, and a worker that gets the job again finds before it starts."""

    async def no_broker(self, job_id) -> None:
        raise ConnectionError("broker connection lost")

    store = ObjectStore(settings)
    async with TestClient(TestServer(create_app(settings))) as client:
        response = await client.post("/api/v1/generate/text-to-video", json={"prompt": "p", "model": "ltx-tiny"})
        job_id = (await response.json())["job_id"]
        if started:
            queued = await store.get_record(job_id)
            await store.put_record(queued.advance(status=JobStatus.RUNNING, attempts=1, worker="worker-x"))
        monkeypatch.setattr(GatewayBroker, "publish_cancel", no_broker)
        response = await client.post(f"/api/v1/jobs/{job_id}/cancel")
        body = await response.json()
        again = await client.post(f"/api/v1/jobs/{job_id}/cancel")
        again_body = await again.json()
        record = await store.get_record(job_id)
    if started:
        assert response.status == 202 and body["status"] == "running" and body["cancel_requested_at"]
        assert record.status == JobStatus.RUNNING and record.cancel_requested_at is not None and record.seq == 1
        assert again.status == 202 and again_body["cancel_requested_at"] == body["cancel_requested_at"]
    else:
        assert response.status == 200 and body["status"] == "cancelled" and body["cancel_requested_at"] is None
        assert record.status == JobStatus.CANCELLED and again.status == 409


async def test_the_openai_listing_reaches_every_video_newest_first(settings, monkeypatch) -> None:
    """A page goes on after the entry of `after`, found through its record, not within a bounded
    scan of the newest entries: a key's older videos can be listed too. A deleted `after` (a
    client deleting each video of the page it read) works as well."""
    monkeypatch.setattr(openai_api, "ASC_SCAN_MAX", 4)  # what the listing of oldest first reads at most
    store = ObjectStore(settings)
    async with TestClient(TestServer(create_app(settings))) as client:
        start = utcnow()
        records = []  # newest first
        for age in range(7):
            at = start - timedelta(seconds=age)
            records.append(queued_record(str(uuid.uuid4()), created_at=at, updated_at=at))
        writes = [store.put_record(r) for r in records]
        writes += [store.put_bytes(index_key(r.job_id, r.model, r.created_at, None), b"", "") for r in records]
        await asyncio.gather(*writes)

        async def listed(after: str | None) -> list[str]:
            seen: list[str] = []
            while True:
                params = {"limit": "3", "order": "desc"} | ({"after": after} if after else {})
                response = await client.get("/v1/videos", params=params)
                page = await response.json()
                assert response.status == 200, page
                seen += [video["id"] for video in page["data"]]
                if not page["has_more"]:
                    return seen
                after = page["last_id"]

        assert await listed(None) == [r.job_id for r in records]
        gone = records[2]
        await store.put_record(gone.model_copy(update={"deleted_at": utcnow()}))
        await store.delete(index_key(gone.job_id, gone.model, gone.created_at, None))
        assert await listed(gone.job_id) == [r.job_id for r in records[3:]]
        # A job of an API key that an earlier version also indexed under index/jobs/, as a gateway
        # without keys lists it: the page after it goes on in that listing.
        owned = records[4].model_copy(update={"owner": "legacy-key"})
        await store.put_record(owned)
        assert await listed(owned.job_id) == [r.job_id for r in records[5:]]
        response = await client.get("/v1/videos", params={"after": str(uuid.uuid4())})
        assert response.status == 400 and (await response.json())["error"]["param"] == "after"


async def test_an_openai_page_past_its_scan_limit_without_a_video_reads_on_to_one(settings, monkeypatch) -> None:
    """Entries that are no video (downloads, leftovers without a record) fill more than a page's
    scan: the page must still end with a video, or the client has no `after` to go on from."""
    monkeypatch.setattr(openai_api, "PAGE_SCAN_MAX", 3)
    monkeypatch.setattr(openai_api, "LIST_BATCH", 2)
    store = ObjectStore(settings)
    async with TestClient(TestServer(create_app(settings))) as client:
        start = utcnow()
        leftovers = [str(uuid.uuid4()) for _ in range(5)]  # newest: index entries without a record
        video = queued_record(str(uuid.uuid4()), created_at=start - timedelta(seconds=9))
        writes = [
            store.put_record(video),
            store.put_bytes(index_key(video.job_id, video.model, video.created_at, None), b"", ""),
        ]
        for age, job_id in enumerate(leftovers):
            writes.append(store.put_bytes(index_key(job_id, "ltx-tiny", start - timedelta(seconds=age), None), b"", ""))
        await asyncio.gather(*writes)
        page = await (await client.get("/v1/videos", params={"limit": "2"})).json()
        assert [v["id"] for v in page["data"]] == [video.job_id] and page["last_id"] == video.job_id


async def test_the_openai_listing_reaches_every_video_oldest_first(settings) -> None:
    """Oldest first, the listing starts at the oldest video of the index, not at the oldest of its
    newest entries, and goes on after any `after`, a deleted one too."""
    store = ObjectStore(settings)
    async with TestClient(TestServer(create_app(settings))) as client:
        # Older than anything else in the index: the first videos oldest first.
        start = datetime(2001, 1, 1, tzinfo=UTC)
        records = []  # oldest first
        for age in range(7):
            at = start + timedelta(seconds=age)
            records.append(queued_record(str(uuid.uuid4()), created_at=at, updated_at=at))
        writes = [store.put_record(r) for r in records]
        writes += [store.put_bytes(index_key(r.job_id, r.model, r.created_at, None), b"", "") for r in records]
        await asyncio.gather(*writes)

        async def first_pages(after: str | None, pages: int) -> list[str]:
            seen: list[str] = []
            for _ in range(pages):
                params = {"limit": "3", "order": "asc"} | ({"after": after} if after else {})
                response = await client.get("/v1/videos", params=params)
                page = await response.json()
                assert response.status == 200, page
                seen += [video["id"] for video in page["data"]]
                after = page["last_id"]
            return seen

        ours = [r.job_id for r in records]
        assert (await first_pages(None, 3))[:7] == ours
        gone = records[2]
        await store.put_record(gone.model_copy(update={"deleted_at": utcnow()}))
        await store.delete(index_key(gone.job_id, gone.model, gone.created_at, None))
        assert (await first_pages(gone.job_id, 2))[:4] == ours[3:]
        response = await client.get("/v1/videos", params={"order": "asc", "after": str(uuid.uuid4())})
        assert response.status == 400 and (await response.json())["error"]["param"] == "after"


async def test_an_idempotency_key_is_remembered_through_a_passing_store_error(settings, monkeypatch) -> None:
    """The first write of the key's record fails (a dropped connection): it is tried again, so a
    retry of the request finds the job instead of making a second one."""
    real, failed = ObjectStore.put_if, []

    async def flaky(self, key, data, etag, content_type="application/json"):
        if key.startswith("idempotency/") and not failed:
            failed.append(key)
            raise ConnectionResetError("the store dropped the connection")
        return await real(self, key, data, etag, content_type)

    monkeypatch.setattr(ObjectStore, "put_if", flaky)
    async with TestClient(TestServer(create_app(settings))) as client:
        answers = []
        for _ in range(2):
            response = await client.post(
                "/api/v1/generate/text-to-video",
                json={"prompt": "once", "model": "ltx-tiny"},
                headers={"Idempotency-Key": "flaky-store"},
            )
            answers.append((response.status, (await response.json())["job_id"], response.headers))
    assert failed and [status for status, _, _ in answers] == [202, 202]
    assert answers[0][1] == answers[1][1] and answers[1][2].get("Idempotent-Replayed") == "true"


def _stored_then_unanswered(monkeypatch, matches) -> list[str]:
    """The store takes the first matching conditional write, then its answer is lost (a read
    time-out): the write's outcome is unknown to the gateway. Returns the keys it did this to."""
    real, lost = ObjectStore._request, []

    async def request(self, method, key, body=b"", headers=None):
        result = await real(self, method, key, body, headers)
        if method == "PUT" and matches(key) and not lost:
            lost.append(key)
            raise StoreUnanswered(f"no answer from the store within its time-out for PUT {key}")
        return result

    monkeypatch.setattr(ObjectStore, "_request", request)
    return lost


async def test_an_idempotency_key_stored_but_unanswered_keeps_its_job(settings, monkeypatch) -> None:
    """The key's record is stored, its answer lost, and the write tried again with a new
    timestamp (refused: the key's record is there): the key names this submission's own job,
    which is answered as made, not cancelled as another submission's duplicate."""
    real, lost = ObjectStore.put_if, []

    async def stored_then_lost(self, key, data, etag, content_type="application/json"):
        result = await real(self, key, data, etag, content_type)
        if key.startswith("idempotency/") and not lost:
            lost.append(key)
            raise ConnectionResetError("the answer was lost")
        return result

    monkeypatch.setattr(ObjectStore, "put_if", stored_then_lost)
    store = ObjectStore(settings)
    async with TestClient(TestServer(create_app(settings))) as client:
        response = await client.post(
            "/api/v1/generate/text-to-video",
            json={"prompt": "once", "model": "ltx-tiny"},
            headers={"Idempotency-Key": "answer-lost"},
        )
        body = await response.json()
        [job_id] = await stored_jobs(store)
        record = await store.get_record(job_id)
    assert lost and response.status == 202 and "Idempotent-Replayed" not in response.headers, body
    assert body["job_id"] == job_id and record.status == JobStatus.QUEUED


async def test_a_cancel_stored_but_unanswered_is_done_and_announced(settings, monkeypatch) -> None:
    """The cancelled record is stored and its answer lost: the store holds this write, so the
    cancel is done (200), and its end is published (webhooks, quota and queue figures hear it)."""
    store = ObjectStore(settings)
    async with TestClient(TestServer(create_app(settings))) as client:
        heard: list[JobStatus] = []
        client.app[HUB].listeners.append(lambda event: heard.append(event.status))
        response = await client.post("/api/v1/generate/text-to-video", json={"prompt": "p", "model": "ltx-tiny"})
        job_id = (await response.json())["job_id"]
        lost = _stored_then_unanswered(monkeypatch, lambda key: key.endswith("job.json"))
        cancelled = await client.post(f"/api/v1/jobs/{job_id}/cancel")
        record = await store.get_record(job_id)
    assert lost and cancelled.status == 200, await cancelled.text()
    assert record.status == JobStatus.CANCELLED and JobStatus.CANCELLED in heard


async def test_deleting_a_video_that_ends_while_it_is_cancelled_deletes_it(settings, monkeypatch) -> None:
    """DELETE of a running video whose job succeeds as the cancel is made: the job has ended, so
    it is deleted like any ended one (it answered deleted, and kept the video)."""
    store = ObjectStore(settings)
    async with TestClient(TestServer(create_app(settings))) as client:
        response = await client.post("/api/v1/generate/text-to-video", json={"prompt": "p", "model": "ltx-tiny"})
        job_id = (await response.json())["job_id"]
        running = (await store.get_record(job_id)).advance(status=JobStatus.RUNNING, attempts=1, worker="w")
        await store.put_record(running)

        async def the_worker_finishes_meanwhile(self, _job_id):
            await store.put_record(running.advance(status=JobStatus.SUCCEEDED, progress=1.0))

        monkeypatch.setattr(GatewayBroker, "publish_cancel", the_worker_finishes_meanwhile)
        deleted = await (await client.delete(f"/v1/videos/{job_id}")).json()
        after = await client.get(f"/v1/videos/{job_id}")
        record = await store.get_record(job_id)
    assert deleted["deleted"] is True
    assert record.deleted_at is not None and after.status == 404


@pytest.mark.parametrize("failing", ["record", "index"])
async def test_a_store_failure_at_submission_leaves_no_queued_record(settings, monkeypatch, failing) -> None:
    """The job's record is stored but its answer lost, or the record is stored and the index entry
    beside it fails: the submission fails (503), and the record is moved on to failed
    (`not_queued`) at once, not left queued until its expiry check."""
    real_record, real_bytes, made = ObjectStore.put_record, ObjectStore.put_bytes, []

    async def put_record(self, record):
        await real_record(self, record)
        made.append(record.job_id)
        if failing == "record":
            raise ConnectionResetError("the answer was lost")

    async def put_bytes(self, key, data, content_type):
        if failing == "index" and key.startswith("index/"):
            raise ConnectionResetError("the store dropped the connection")
        await real_bytes(self, key, data, content_type)

    monkeypatch.setattr(ObjectStore, "put_record", put_record)
    monkeypatch.setattr(ObjectStore, "put_bytes", put_bytes)
    store = ObjectStore(settings)
    async with TestClient(TestServer(create_app(settings))) as client:
        response = await client.post("/api/v1/generate/text-to-video", json={"prompt": "p", "model": "ltx-tiny"})
        record = await store.get_record(made[0])
    assert response.status == 503 and record.status == JobStatus.FAILED and record.error.code == "not_queued"


class Upload:
    """An image-to-video submission in JSON whose body may carry a file (it takes an upload
    slot): sent `slowly()` (chunked, held after 10 bytes until `go_on` is set) or `at_once()`."""

    path = "/api/v1/generate/image-to-video"

    def __init__(self) -> None:
        image = base64.b64encode(png_bytes(32, 32)).decode()
        self.body = json.dumps({"prompt": "an upload", "model": "wan-i2v-tiny", "image": image}).encode()
        self.go_on = asyncio.Event()

    async def slowly(self) -> AsyncIterator[bytes]:  # chunked: its length is not known up front
        yield self.body[:10]
        await self.go_on.wait()
        yield self.body[10:]

    async def at_once(self) -> AsyncIterator[bytes]:
        yield self.body


async def test_uploads_past_the_gateways_slots_wait_their_turn_then_get_503(settings, monkeypatch) -> None:
    """With one upload slot: a second body that may carry a file waits while the first is read,
    and gets 503 uploads_busy once it has waited its limit; a small body (its length known and
    within max_body_bytes) does not wait; once the first is done, the next upload gets its turn."""
    monkeypatch.setattr(handlers, "UPLOAD_WAIT_S", 0.5)
    settings = settings.model_copy(update={"max_concurrent_uploads": 1})
    upload = Upload()
    body, path, slowly, at_once, go_on = upload.body, upload.path, upload.slowly, upload.at_once, upload.go_on
    headers = {"Content-Type": "application/json"}

    async with TestClient(TestServer(create_app(settings))) as client:
        first = asyncio.create_task(client.post(path, data=slowly(), headers=headers))

        async def first_reading() -> bool:
            return client.app[UPLOAD_SLOTS].locked()

        await until(first_reading, 10, "the first upload to take the slot")
        busy = await client.post(path, data=at_once(), headers=headers)
        assert busy.status == 503 and busy.headers["Retry-After"] == "5"
        assert (await busy.json())["error"]["code"] == "uploads_busy"
        small = await client.post(path, data=body, headers=headers)  # Content-Length: 100-odd bytes
        assert small.status == 202, await small.text()
        # What is refused without reading the body is refused at once, not told to retry later.
        for refused, status in (
            (client.post(path, data=at_once(), headers={"Content-Type": "text/plain"}), 415),
            (client.post(path, data=at_once(), headers=headers | {"Idempotency-Key": "\t"}), 400),
            (client.post(path, data=at_once(), headers=headers | {"Content-Length": str(10**10)}), 413),
            (client.post("/v1/videos", data=at_once(), headers={"Content-Type": "text/plain"}), 415),
        ):
            assert (await asyncio.wait_for(refused, 5)).status == status
        go_on.set()
        assert (await first).status == 202
        later = await client.post(path, data=at_once(), headers=headers)
        assert later.status == 202, await later.text()
        assert not client.app[UPLOAD_SLOTS].locked()


async def test_one_key_holds_at_most_half_the_upload_slots(settings, monkeypatch, tmp_path) -> None:
    """With two slots, a key whose upload comes slowly holds one: its next upload waits for its
    own turn (then 503, naming the key's share), while another key's upload is read at once."""
    from gateway.keys import UPLOAD_SLOTS_BY_KEY

    monkeypatch.setattr(handlers, "UPLOAD_WAIT_S", 0.5)
    keys = tmp_path / "keys.toml"
    devstack.write_api_keys(keys, {"slow": {"token": "vg_slow-0123456789"}, "other": {"token": "vg_other-0123456789"}})
    settings = settings.model_copy(update={"max_concurrent_uploads": 2, "auth_disabled": False, "api_keys_file": keys})
    upload = Upload()
    path, slowly, at_once, go_on = upload.path, upload.slowly, upload.at_once, upload.go_on
    slow = {"Content-Type": "application/json", "Authorization": "Bearer vg_slow-0123456789"}
    other = slow | {"Authorization": "Bearer vg_other-0123456789"}

    async with TestClient(TestServer(create_app(settings))) as client:
        first = asyncio.create_task(client.post(path, data=slowly(), headers=slow))

        async def first_reading() -> bool:
            share = client.app[UPLOAD_SLOTS_BY_KEY].get("slow")
            return share is not None and share.locked()

        await until(first_reading, 10, "the slow key's upload to take its share")
        busy = await client.post(path, data=at_once(), headers=slow)
        assert busy.status == 503 and "this API key's uploads" in (await busy.json())["error"]["message"]
        theirs = await client.post(path, data=at_once(), headers=other)
        assert theirs.status == 202, await theirs.text()
        go_on.set()
        assert (await first).status == 202
        assert not client.app[UPLOAD_SLOTS].locked()


async def test_a_stopping_gateway_ends_its_websockets_at_once(settings) -> None:
    """The close (1001) goes out when the gateway stops, and the connection ends a second later
    at most: the client's answer to the close, which a stopping server no longer reads, is not
    waited for. A client that waits for the connection to end after answering, as the RFC has
    it (browsers, `websockets`), hears of it at once rather than after 10 s."""
    import base64
    import os
    import struct
    import time

    import aiohttp

    server = TestServer(create_app(settings))
    await server.start_server()
    async with aiohttp.ClientSession() as http:
        response = await http.post(server.make_url("/api/v1/generate/text-to-video"), json={"prompt": "p"})
        job_id = (await response.json())["job_id"]
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET /api/v1/ws?job_id={job_id} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")

    async def frame() -> tuple[int, bytes]:
        first, size = await reader.readexactly(2)
        size &= 0x7F
        if size == 126:
            (size,) = struct.unpack("!H", await reader.readexactly(2))
        elif size == 127:
            (size,) = struct.unpack("!Q", await reader.readexactly(8))
        return first & 0x0F, await reader.readexactly(size)

    assert json.loads((await frame())[1])["status"] == "queued"
    started = time.monotonic()
    stopping = asyncio.ensure_future(server.close())
    opcode, payload = await frame()
    assert opcode == 8 and struct.unpack("!H", payload[:2])[0] == 1001, payload
    mask = os.urandom(4)  # the client's answer: a masked close frame with the same code
    writer.write(
        bytes([0x88, 0x80 | len(payload[:2])]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload[:2]))
    )
    assert await reader.read() == b""  # the gateway ended the connection
    await stopping
    writer.close()
    assert time.monotonic() - started < 5
