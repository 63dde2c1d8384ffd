"""Webhook delivery: a delivery connects only to addresses that were checked, even when the host's
DNS answer changes after the check (DNS rebinding); a failed attempt sends the event to the delay
queue of the pause that follows it and lets go of its message, so pauses hold no delivery slot."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from types import SimpleNamespace

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

from common.settings import GatewaySettings
from common.topology import Topology
from gateway import webhooks
from gateway.webhooks import ATTEMPT_HEADER, DestinationRefused, WebhookDeliverer, attempt_of, webhook_client
from schemas.jobs import JobStatus, Phase, Webhook
from schemas.messages import JobEvent, encode

JOB_ID = "0f3c2b9e-7a51-4c8e-9f0d-2e6b1a4d5c37"


class Rebinding(AbstractResolver):
    """A DNS server under an attacker's control: every name resolves to 127.0.0.1."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.asked.append(host)
        return [{"hostname": host, "host": "127.0.0.1", "port": port, "family": socket.AF_INET, "proto": 0, "flags": 0}]

    async def close(self) -> None:
        pass


@asynccontextmanager
async def receiving(status: int, hold: asyncio.Event | None = None):
    """An HTTP server on the loopback address answering `status` (once `hold` is set, if given):
    (its port, the webhook-ids it got)."""
    calls: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        calls.append(request.headers.get("webhook-id", ""))
        if hold is not None:
            await hold.wait()
        return web.Response(status=status)

    app = web.Application()
    app.router.add_post("/hook", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield port, calls
    finally:
        await runner.cleanup()


@pytest.fixture
async def local_receiver():
    async with receiving(200) as receiver:
        yield receiver


def settings(allow: list[str]) -> GatewaySettings:
    secret = "whsec_" + base64.b64encode(os.urandom(24)).decode()
    return GatewaySettings(webhook_secret=secret, webhook_allow_hosts=allow, webhook_max_attempts=3)


@pytest.mark.parametrize("allow", [[], ["10.0.0.0/8", "hooks.internal"]])
async def test_a_name_that_resolves_to_loopback_at_connection_is_refused(local_receiver, allow) -> None:
    port, hits = local_receiver
    resolver = Rebinding()
    async with webhook_client(settings(allow), resolver) as http:
        with pytest.raises(aiohttp.ClientConnectorError) as raised:
            await http.post(f"http://hooks.example:{port}/hook", data=b"{}")
    assert isinstance(raised.value.os_error, DestinationRefused)
    assert "127.0.0.1" in str(raised.value.os_error) and "VIDEOGEN_WEBHOOK_ALLOW_HOSTS" in str(raised.value.os_error)
    assert resolver.asked == ["hooks.example"] and hits == []


@pytest.mark.parametrize("allow", [["hooks.example"], ["127.0.0.0/8"]])
async def test_an_allowed_host_or_network_is_reached(local_receiver, allow) -> None:
    port, hits = local_receiver
    async with webhook_client(settings(allow), Rebinding()) as http:
        async with http.post(f"http://hooks.example:{port}/hook", data=b"{}") as reply:
            assert reply.status == 200
    assert len(hits) == 1


class Settled:
    """An incoming message as aio-pika hands it over, settled once."""

    def __init__(self, body: bytes, headers: dict | None = None) -> None:
        self.body, self.headers = body, headers
        self.content_type, self.type, self.message_id = "application/json", "job.event", "m-1"
        self.settled: str | None = None
        self.channel = SimpleNamespace(is_closed=False)

    async def ack(self) -> None:
        assert self.settled is None
        self.settled = "ack"

    async def nack(self, requeue: bool = True) -> None:
        assert self.settled is None
        self.settled = f"nack(requeue={requeue})"


async def test_a_delivery_whose_host_rebinds_after_the_check_is_refused_not_retried(
    local_receiver, monkeypatch
) -> None:
    """The check before each attempt saw a public address; the connection's own lookup gets
    127.0.0.1. Nothing reaches the loopback receiver, and the delivery ends at once."""
    port, hits = local_receiver
    checked: list[str] = []

    async def public_when_checked(url: str, allow: list[str], delivering: bool = False) -> None:
        checked.append(url)
        return None

    monkeypatch.setattr(webhooks, "destination_problem", public_when_checked)
    config = settings([])
    deliverer = WebhookDeliverer(config, store=None, topology=None)  # type: ignore[arg-type]
    deliverer._http = webhook_client(config, Rebinding())
    now = datetime.now(UTC)
    event = JobEvent(job_id=JOB_ID, seq=1, status=JobStatus.RUNNING, phase=Phase.LOADING, progress=0.0, timestamp=now)
    hook = Webhook(url=f"http://hooks.example:{port}/hook", events=["job.running"])
    message = Settled(b"", None)
    logged: list[str] = []
    monkeypatch.setattr(webhooks.log, "warning", lambda name, **_: logged.append(name))
    try:
        await asyncio.wait_for(deliverer._deliver(message, event, hook, 1), 10)  # type: ignore[arg-type]
    finally:
        await deliverer._http.close()
    assert message.settled == "ack" and hits == []
    assert len(checked) == 1 and logged == ["webhook_refused"]


TOPOLOGY = Topology("unit")
RETRY_JOB_ID = "6a0f7c1d-2b3e-4f50-8a9b-0c1d2e3f4a5b"


class Exchange:
    """Publishes are recorded; the first `fails` are refused, as by a delay queue that is full."""

    def __init__(self, fails: int = 0) -> None:
        self.sent: list[tuple[str, object]] = []
        self.fails = fails

    async def publish(self, message, routing_key: str, **_: object) -> None:
        if self.fails:
            self.fails -= 1
            raise ConnectionError("the broker refused the publish")
        self.sent.append((routing_key, message))


class Channel:
    def __init__(self, fails: int = 0) -> None:
        self.default_exchange = Exchange(fails)


@pytest.fixture
async def failing_receiver():
    async with receiving(500) as (port, calls):
        yield f"http://127.0.0.1:{port}/hook", calls


def deliverer(channel: Channel, max_attempts: int = 4) -> WebhookDeliverer:
    secret = "whsec_" + base64.b64encode(os.urandom(24)).decode()
    settings = GatewaySettings(
        webhook_secret=secret, webhook_allow_hosts=["127.0.0.1"], webhook_max_attempts=max_attempts
    )
    made = WebhookDeliverer(settings, store=None, topology=TOPOLOGY)  # type: ignore[arg-type]
    made._http = webhooks.webhook_client(settings)
    made._channel = channel  # type: ignore[assignment]
    return made


def event() -> JobEvent:
    now = datetime.now(UTC)
    return JobEvent(
        job_id=RETRY_JOB_ID, seq=3, status=JobStatus.RUNNING, phase=Phase.DENOISING, progress=0.5, timestamp=now
    )


async def attempt(made: WebhookDeliverer, url: str, number: int) -> Settled:
    headers = None if number == 1 else {ATTEMPT_HEADER: number}
    message = Settled(encode(event()), headers)
    hook = Webhook(url=url, events=["job.running"])
    try:
        await asyncio.wait_for(made._deliver(message, event(), hook, attempt_of(message)), 10)  # type: ignore[arg-type]
    finally:
        await made._http.close()  # type: ignore[union-attr]
    return message


@pytest.mark.parametrize(("number", "pause"), [(1, 1), (2, 2), (3, 4)])
async def test_a_failed_attempt_waits_in_the_delay_queue_of_its_pause(failing_receiver, number, pause) -> None:
    url, calls = failing_receiver
    channel = Channel()
    message = await attempt(deliverer(channel), url, number)
    assert calls == [f"{RETRY_JOB_ID}:3"] and message.settled == "ack"
    [(queue, later)] = channel.default_exchange.sent
    assert queue == TOPOLOGY.webhook_wait_queue(pause) == f"unit.webhooks.wait.{pause}s"
    assert later.headers[ATTEMPT_HEADER] == number + 1 and later.body == message.body  # type: ignore[attr-defined]


async def test_pauses_stop_doubling_at_a_minute(failing_receiver) -> None:
    url, _ = failing_receiver
    channel = Channel()
    await attempt(deliverer(channel, max_attempts=20), url, 12)
    assert [queue for queue, _ in channel.default_exchange.sent] == [TOPOLOGY.webhook_wait_queue(60)]


async def test_the_last_attempt_gives_up(failing_receiver) -> None:
    url, calls = failing_receiver
    channel = Channel()
    message = await attempt(deliverer(channel, max_attempts=4), url, 4)
    assert calls and channel.default_exchange.sent == [] and message.settled == "ack"


async def test_an_event_whose_next_attempt_the_broker_refuses_is_kept_until_it_takes_it(
    failing_receiver, monkeypatch
) -> None:
    """Handed back, the message would make the same attempt again at once: it is kept instead,
    and its copy offered again after a pause, without another request to the receiver."""
    monkeypatch.setattr(webhooks, "RETRY_NOT_QUEUED_PAUSE_S", 0.0)
    url, calls = failing_receiver
    channel = Channel(fails=2)
    message = await attempt(deliverer(channel), url, 2)
    assert len(calls) == 1 and message.settled == "ack"
    assert [queue for queue, _ in channel.default_exchange.sent] == [TOPOLOGY.webhook_wait_queue(2)]


def failing_lookup(errno: int):
    def getaddrinfo(host, *args, **kwargs):
        raise socket.gaierror(errno, "the lookup failed")

    return getaddrinfo


async def test_a_dns_lookup_that_fails_for_now_is_a_failed_attempt_not_a_refusal(monkeypatch) -> None:
    monkeypatch.setattr(socket, "getaddrinfo", failing_lookup(socket.EAI_AGAIN))
    url = "http://hooks.example/hook"
    # At submission any failed lookup is a problem; when delivering, only "no such name" is.
    assert "does not resolve" in (await webhooks.destination_problem(url, []) or "")
    with pytest.raises(OSError):
        await webhooks.destination_problem(url, [], delivering=True)
    channel = Channel()
    message = await attempt(deliverer(channel), url, 1)
    assert message.settled == "ack" and [q for q, _ in channel.default_exchange.sent] == [
        TOPOLOGY.webhook_wait_queue(1)
    ]


async def test_a_name_that_does_not_exist_is_refused_when_delivering(monkeypatch) -> None:
    monkeypatch.setattr(socket, "getaddrinfo", failing_lookup(socket.EAI_NONAME))
    assert "does not resolve" in (
        await webhooks.destination_problem("http://gone.example/h", [], delivering=True) or ""
    )
    channel = Channel()
    message = await attempt(deliverer(channel), "http://gone.example/h", 1)
    assert message.settled == "ack" and channel.default_exchange.sent == []  # dropped, not retried


def test_the_attempt_number_comes_from_the_header_and_defaults_to_one() -> None:
    assert attempt_of(Settled(b"", None)) == 1  # type: ignore[arg-type]
    assert attempt_of(Settled(b"", {ATTEMPT_HEADER: 5})) == 5  # type: ignore[arg-type]
    assert attempt_of(Settled(b"", {ATTEMPT_HEADER: "x"})) == 1  # type: ignore[arg-type]


async def test_closing_stops_taking_messages_before_it_ends_the_attempts() -> None:
    class Queue:
        def __init__(self) -> None:
            self.cancelled: list[str] = []

        async def cancel(self, tag: str) -> None:
            self.cancelled.append(tag)

    made = deliverer(Channel())
    made._queue, made._consumer_tag = Queue(), "ctag-1"  # type: ignore[assignment]
    await made.close()
    assert made._queue.cancelled == ["ctag-1"] and made._http.closed  # type: ignore[union-attr]
    late = Settled(encode(event()), None)  # delivered while the consumer was being cancelled
    await made._on_event(late)  # type: ignore[arg-type]
    assert late.settled is None and not made._tasks  # left unacked, to the broker; no attempt


@asynccontextmanager
async def hanging_receiver():
    """A receiver that takes each request and answers only once released: (its URL, the webhook-ids
    it got, the event that releases them)."""
    release = asyncio.Event()
    async with receiving(200, release) as (port, calls):
        try:
            yield f"http://127.0.0.1:{port}/hook", calls, release
        finally:
            release.set()  # before the server stops: it waits for the requests it holds


async def test_a_receiver_gets_at_most_its_share_of_the_slots(local_receiver) -> None:
    """`webhook_per_receiver` 2: of four events for a receiver that does not answer, two are
    attempted and two wait the shortest pause in the broker, for the same attempt, holding no
    slot; another receiver's event is attempted at once meanwhile."""
    port, quick_calls = local_receiver
    channel = Channel()
    made = deliverer(channel)
    made._settings = made._settings.model_copy(update={"webhook_per_receiver": 2})
    async with hanging_receiver() as (slow_url, slow_calls, release):
        jobs = [f"{RETRY_JOB_ID[:-1]}{i}" for i in range(5)]
        for job_id in jobs[:4]:
            made._known[job_id] = Webhook(url=slow_url, events=["job.running"])
        made._known[jobs[4]] = Webhook(url=f"http://127.0.0.1:{port}/hook", events=["job.running"])
        messages = []
        for job_id in jobs:
            message = Settled(encode(event().model_copy(update={"job_id": job_id})), None)
            messages.append(message)
            await made._on_event(message)  # type: ignore[arg-type]

        async def settled(count: int) -> None:
            while sum(m.settled is not None for m in messages) < count or len(slow_calls) < 2:
                await asyncio.sleep(0.01)

        await asyncio.wait_for(settled(3), 10)  # the two postponed, and the other receiver's
        assert len(slow_calls) == 2 and quick_calls == [f"{jobs[4]}:3"]
        assert [m.settled for m in messages] == [None, None, "ack", "ack", "ack"]
        assert [queue for queue, _ in channel.default_exchange.sent] == [TOPOLOGY.webhook_wait_queue(1)] * 2
        assert [later.headers[ATTEMPT_HEADER] for _, later in channel.default_exchange.sent] == [1, 1]  # type: ignore[attr-defined]
        release.set()
        await asyncio.wait_for(asyncio.gather(*made._tasks), 10)
    assert [m.settled for m in messages] == ["ack"] * 5 and not made._attempting
    await made._http.close()  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        (f"http://{'a' * 70}.com/hook", "not a valid host name"),  # a label over 63 characters
        ("http://a..b/hook", "not a valid host name"),  # an empty label
        ("http://example.com:99999/hook", "port is not a number"),
    ],
)
async def test_a_host_name_the_resolver_cannot_take_is_a_problem_not_an_error(url, problem) -> None:
    assert problem in (await webhooks.destination_problem(url, []) or "")


@pytest.mark.parametrize(
    "host",
    [
        "[::127.0.0.1]",  # IPv4-compatible
        "[::ffff:127.0.0.1]",  # IPv4-mapped
        "[64:ff9b::7f00:1]",  # NAT64 to 127.0.0.1
        "[64:ff9b::a00:1]",  # NAT64 to 10.0.0.1
        "[2002:7f00:1::1]",  # 6to4 of 127.0.0.1
        "[fec0::1]",  # site-local
        "127.1",
        "0x7f000001",
    ],
)
async def test_ipv6_addresses_that_stand_for_private_ipv4_ones_are_refused(host) -> None:
    problem = await webhooks.destination_problem(f"http://{host}/hook", [])
    assert problem is not None and "private, loopback, multicast or reserved" in problem, problem


@pytest.mark.parametrize("host", ["224.0.0.1", "224.0.0.251", "239.255.255.250", "[ff02::1]", "[ff0e::1]"])
async def test_multicast_addresses_are_refused(host) -> None:
    """Group addresses, not a receiver (Python counts some of them as global)."""
    problem = await webhooks.destination_problem(f"http://{host}/hook", [])
    assert problem is not None and "multicast" in problem, problem


async def test_port_zero_is_refused() -> None:
    problem = await webhooks.destination_problem("http://8.8.8.8:0/hook", [])
    assert problem == "the URL's port is not a number from 1 to 65535"


async def test_ipv6_addresses_that_stand_for_public_ipv4_ones_pass() -> None:
    assert await webhooks.destination_problem("http://[64:ff9b::808:808]/hook", []) is None  # NAT64 to 8.8.8.8
    assert await webhooks.destination_problem("http://[2606:4700:4700::1111]/hook", []) is None


async def test_a_webhook_lookup_that_fails_is_tried_again_holding_the_event(local_receiver, monkeypatch) -> None:
    """The store is down for a moment: the event is not handed back to the broker (RabbitMQ 4
    would count that against a delivery limit and drop it), it waits here and is delivered."""
    port, hits = local_receiver
    monkeypatch.setattr(webhooks.asyncio, "sleep", _no_pause)
    made = deliverer(Channel())
    failures = [ConnectionError("store down")] * 2

    async def webhook_of(job_id: str) -> Webhook:
        if failures:
            raise failures.pop()
        return Webhook(url=f"http://127.0.0.1:{port}/hook", events=["job.running"])

    made._webhook_of = webhook_of  # type: ignore[method-assign]
    message = Settled(encode(event()), None)
    await made._on_event(message)  # type: ignore[arg-type]
    await asyncio.wait_for(asyncio.gather(*made._tasks), 10)
    assert message.settled == "ack" and len(hits) == 1
    await made._http.close()  # type: ignore[union-attr]


_sleep = asyncio.sleep


async def _no_pause(seconds: float) -> None:
    await _sleep(0)


async def test_an_attempt_whose_channel_closed_meanwhile_makes_no_second_retry_chain() -> None:
    """The connection drops during a failing attempt: the broker has the message back and delivers
    it again (the same attempt once more). No copy for the next attempt is queued beside it, or
    each drop would double the event's retries."""
    hold = asyncio.Event()
    async with receiving(500, hold) as (port, calls):
        channel = Channel()
        made = deliverer(channel)
        message = Settled(encode(event()), None)
        hook = Webhook(url=f"http://127.0.0.1:{port}/hook", events=["job.running"])
        delivering = asyncio.ensure_future(made._deliver(message, event(), hook, attempt_of(message)))  # type: ignore[arg-type]
        while not calls:
            await asyncio.sleep(0.01)
        message.channel.is_closed = True  # the connection dropped while the receiver thought
        hold.set()
        await asyncio.wait_for(delivering, 10)
        await made._http.close()  # type: ignore[union-attr]
    assert channel.default_exchange.sent == [], "a copy for attempt 2 beside the redelivered attempt 1"


def test_logs_show_a_webhook_url_without_its_credentials() -> None:
    from gateway.webhooks import logged_url

    assert logged_url("https://user:secret@hooks.example:8443/h?x=1") == "https://***@hooks.example:8443/h?x=1"
    assert logged_url("https://token@hooks.example/h") == "https://***@hooks.example/h"
    assert logged_url("https://hooks.example/h") == "https://hooks.example/h"
