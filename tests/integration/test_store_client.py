"""The store client's single-object calls (`common/store.py`), made on the event loop with
aiohttp and signed with minio's helpers: against the real store (SeaweedFS checks every
signature), and against a stand-in S3 server for the answers a healthy store does not give
(a 503, no answer at all)."""

from __future__ import annotations

import asyncio
import socket
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
    """A stand-in S3 endpoint: answers each request with the next of `answers`, then 200 (with
    what was last stored, for a GET). An answer is a status; "hang" never answers; "lose" stores
    the body and drops the connection, as a store that took a write whose answer was lost.
    Records the requests it got."""

    def __init__(self, *answers: int | str) -> None:
        self.answers, self.requests, self.stored = list(answers), [], None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append((request.method, dict(request.headers)))
        assert request.headers["Authorization"].startswith("AWS4-HMAC-SHA256 Credential=")
        answer = self.answers.pop(0) if self.answers else 200
        if answer == "hang":
            await asyncio.sleep(30)
        if answer == "lose":
            self.stored = body
            request.transport.close()
            return web.Response()
        if answer == 200:
            if request.method == "PUT":
                self.stored = body
            elif self.stored is None:
                return web.Response(status=404)
            return web.Response(body=b"" if request.method == "PUT" else self.stored, headers={"ETag": '"abc"'})
        body = f"<Error><Code>Code{answer}</Code><Message>m</Message></Error>".encode()
        return web.Response(status=answer, body=body, content_type="application/xml")


@pytest.fixture
async def stand_in():
    async def serve(*answers: int | str, timeout_s: float = 10.0):
        fake = StandIn(*answers)
        app = web.Application(client_max_size=64 << 20)
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


def methods(fake: StandIn) -> list[str]:
    return [method for method, _ in fake.requests]


async def test_a_busy_store_is_asked_again_twice_then_the_error_stands(stand_in) -> None:
    fake, store = await stand_in(503, 502)
    await store.put_bytes("k", b"stored", "text/plain")
    assert methods(fake) == ["PUT"] * 3 and await store.get_tagged("k") == (b"stored", "abc")
    fake, store = await stand_in(503, 503, 503, 503)
    with pytest.raises(StoreError) as raised:
        await store.put_bytes("k", b"x", "text/plain")
    assert raised.value.status == 503 and raised.value.code == "Code503" and len(fake.requests) == 3


async def test_an_error_that_asking_again_cannot_mend_is_not_asked_again(stand_in) -> None:
    fake, store = await stand_in(400)
    with pytest.raises(StoreError) as raised:
        await store.put_bytes("k", b"x", "text/plain")
    assert raised.value.code == "Code400" and len(fake.requests) == 1


async def test_reads_ask_for_the_bytes_as_stored(stand_in) -> None:
    """No compression: a proxy that gzips answers would hand gzip bytes to the record parser."""
    fake, store = await stand_in()
    await store.put_bytes("k", b"{}", "application/json")
    await store.get_bytes("k")
    assert [headers.get("Accept-Encoding") for _, headers in fake.requests] == ["identity", "identity"]


async def test_a_conditional_write_taken_then_answered_with_server_errors_is_read_back(stand_in) -> None:
    """The store takes the write and its answer is lost; the tries after it get 503 (refused
    for being busy): the write is done, which only reading the object shows."""
    fake, store = await stand_in("lose", 503, 503, 503, 503)
    etag = await store.put_if("k", b'{"v": 1}', None)
    assert etag == "abc" and fake.stored == b'{"v": 1}' and methods(fake)[-1] == "GET"


async def test_a_conditional_write_refused_by_server_errors_only_is_not_taken_for_done(stand_in) -> None:
    fake, store = await stand_in(503, 503, 503)
    with pytest.raises(StoreError) as raised:
        await store.put_if("k", b'{"v": 1}', None)
    assert raised.value.status == 503 and methods(fake) == ["PUT", "PUT", "PUT", "GET"]


async def test_a_store_that_does_not_answer_fails_the_call_once_after_the_time_out(stand_in) -> None:
    fake, store = await stand_in("hang", timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(StoreUnanswered):
        await store.put_bytes("k", b"x", "text/plain")
    assert 0.5 <= time.monotonic() - started < 5 and len(fake.requests) == 1


async def test_a_body_the_store_stops_reading_fails_the_call() -> None:
    """The time-out also covers sending: s3_timeout_s plus a second per MiB of body."""

    async def reads_headers_only(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(30)

    listening = socket.socket()
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # as a slow link would leave it
    listening.bind(("127.0.0.1", 0))
    server = await asyncio.start_server(reads_headers_only, sock=listening)
    port = listening.getsockname()[1]
    store = ObjectStore(CommonSettings(s3_endpoint=f"127.0.0.1:{port}", s3_secret_key="s", s3_timeout_s=0.5))
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnanswered):
            await store.put_bytes("k", b"x" * (4 << 20), "application/octet-stream")  # more than socket buffers
        assert time.monotonic() - started < 0.5 + 4 + 10
    finally:
        await store.close()
        server.close()


async def test_an_unreachable_store_is_tried_three_times_then_unanswered() -> None:
    connections = 0

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store = ObjectStore(CommonSettings(s3_endpoint=f"127.0.0.1:{port}", s3_secret_key="s"))
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnanswered):
            await store.get_bytes("k")
        # Three tries, 0.2 s and 0.4 s apart (aiohttp itself may send each twice).
        assert connections >= 3 and time.monotonic() - started >= 0.6
    finally:
        await store.close()
        server.close()


async def test_calls_in_flight_when_the_client_closes_fail_as_store_errors(stand_in) -> None:
    """At shutdown: what is still waiting for the store fails like an outage (the gateway
    answers 503, quota releases log and leave it to the next listing), and so does any later call."""
    fake, store = await stand_in("hang", "hang", "hang")
    calls = [
        asyncio.ensure_future(call)
        for call in (store.put_bytes("a", b"x", "t"), store.get_bytes("b"), store.put_if("c", b"x", None))
    ]
    await until_requests(fake, 3)
    await store.close()
    for outcome in await asyncio.gather(*calls, return_exceptions=True):
        assert isinstance(outcome, StoreUnanswered) and isinstance(outcome, STORE_ERRORS), outcome
    for later in (store.delete("d"), store.list_keys("", None, 10)):
        with pytest.raises(StoreUnanswered):
            await later


async def until_requests(fake: StandIn, count: int, deadline_s: float = 5.0) -> None:
    deadline = time.monotonic() + deadline_s
    while len(fake.requests) < count:
        assert time.monotonic() < deadline, fake.requests
        await asyncio.sleep(0.01)
