"""The store client's single-object calls (`common/store.py`), made on the event loop with
aiohttp and signed with minio's helpers: against the real store (SeaweedFS checks every
signature), and against a stand-in S3 server for the answers a healthy store does not give
(a 503, no answer at all)."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from common.settings import CommonSettings
from common.store import STORE_ERRORS, ObjectStore, StoreError, StoreUnanswered
from tests.integration.test_record_writes import settings_of


@pytest.fixture
async def store(s3_store):
    made = ObjectStore(settings_of(s3_store))
    yield made
    await made.close()


async def test_objects_round_trip_under_keys_that_need_quoting(store) -> None:
    big = bytes(range(256)) * (3 * 4096 + 7)  # 3 MiB and a bit: hashed off the event loop
    for key, data in [("t/a b+c~d/é(1).json", b'{"x": 1}'), ("t/big.bin", big), ("t/empty", b"")]:
        await store.put_bytes(key, data, "application/octet-stream")
        found = await store.get_tagged(key)
        assert found is not None and found[0] == data and found[1], key
    await store.delete("t/empty")
    assert await store.get_bytes("t/empty") is None
    await store.delete("t/never-written")  # deleting what is not there is no error


async def test_a_wrong_secret_is_an_s3_error_the_gateway_answers_503_to(s3_store) -> None:
    wrong = ObjectStore(
        CommonSettings(
            s3_endpoint=s3_store.endpoint,
            s3_access_key=s3_store.access_key,
            s3_secret_key="not-the-secret",
            s3_bucket=s3_store.bucket,
        )
    )
    try:
        with pytest.raises(StoreError) as raised:
            await wrong.put_bytes("t/refused", b"x", "text/plain")
        assert raised.value.status == 403 and raised.value.code == "SignatureDoesNotMatch", raised.value
        assert isinstance(raised.value, STORE_ERRORS)
    finally:
        await wrong.close()


class StandIn:
    """A stand-in S3 endpoint: answers each PUT or GET with the next of `answers` (a status, or
    "hang" to never answer), then 200; counts the requests it got."""

    def __init__(self, *answers: int | str) -> None:
        self.answers, self.requests = list(answers), 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        await request.read()
        assert request.headers["Authorization"].startswith("AWS4-HMAC-SHA256 Credential=")
        answer = self.answers.pop(0) if self.answers else 200
        if answer == "hang":
            await asyncio.sleep(30)
        if answer == 200:
            return web.Response(body=b"stored", headers={"ETag": '"abc"'})
        body = f"<Error><Code>Code{answer}</Code><Message>m</Message></Error>".encode()
        return web.Response(status=answer, body=body, content_type="application/xml")


@pytest.fixture
async def stand_in():
    async def serve(*answers: int | str, timeout_s: float = 10.0):
        fake = StandIn(*answers)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", fake.handle)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        settings = CommonSettings(
            s3_endpoint=f"127.0.0.1:{server.port}", s3_bucket="b", s3_timeout_s=timeout_s, s3_secret_key="s"
        )
        store = ObjectStore(settings)
        stores.append(store)
        return fake, store

    servers, stores = [], []
    yield serve
    for store in stores:
        await store.close()
    for server in servers:
        await server.close()


async def test_a_busy_store_is_asked_again_twice_then_the_error_stands(stand_in) -> None:
    fake, store = await stand_in(503, 502)
    assert await store.get_tagged("k") == (b"stored", "abc")
    assert fake.requests == 3
    fake, store = await stand_in(503, 503, 503, 503)
    with pytest.raises(StoreError) as raised:
        await store.put_bytes("k", b"x", "text/plain")
    assert raised.value.status == 503 and raised.value.code == "Code503" and fake.requests == 3


async def test_an_error_that_asking_again_cannot_mend_is_not_asked_again(stand_in) -> None:
    fake, store = await stand_in(400)
    with pytest.raises(StoreError) as raised:
        await store.put_bytes("k", b"x", "text/plain")
    assert raised.value.code == "Code400" and fake.requests == 1


async def test_a_store_that_does_not_answer_fails_the_call_once_after_the_time_out(stand_in) -> None:
    fake, store = await stand_in("hang", timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(StoreUnanswered):
        await store.put_bytes("k", b"x", "text/plain")
    assert 0.5 <= time.monotonic() - started < 5 and fake.requests == 1


async def test_an_unreachable_store_is_tried_three_times_then_unanswered() -> None:
    store = ObjectStore(CommonSettings(s3_endpoint="127.0.0.1:9", s3_secret_key="s"))  # nothing listens
    try:
        with pytest.raises(StoreUnanswered):
            await store.get_bytes("k")
        with pytest.raises(StoreUnanswered):  # and a closed client refuses calls
            await store.close()
            await store.get_bytes("k")
    finally:
        await store.close()
