"""Webhook destinations: a delivery connects only to addresses that were checked, even when the
host's DNS answer changes after the check (DNS rebinding)."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
from datetime import UTC, datetime

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

from common.settings import GatewaySettings
from gateway import webhooks
from gateway.webhooks import DestinationRefused, WebhookDeliverer, webhook_client
from schemas.jobs import JobStatus, Phase, Webhook
from schemas.messages import JobEvent

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


@pytest.fixture
async def local_receiver():
    """An HTTP server on the loopback address, counting the requests that reach it."""
    hits: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/hook", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield port, hits
    await runner.cleanup()


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
    assert hits == ["/hook"]


class Message:
    """The event's broker message: acked once the delivery is done or given up."""

    def __init__(self) -> None:
        self.acked = asyncio.Event()

    async def ack(self) -> None:
        self.acked.set()


async def test_a_delivery_whose_host_rebinds_after_the_check_is_refused_not_retried(
    local_receiver, monkeypatch
) -> None:
    """The check before each attempt saw a public address; the connection's own lookup gets
    127.0.0.1. Nothing reaches the loopback receiver, and the delivery ends at once."""
    port, hits = local_receiver
    checked: list[str] = []

    async def public_when_checked(url: str, allow: list[str]) -> None:
        checked.append(url)
        return None

    monkeypatch.setattr(webhooks, "destination_problem", public_when_checked)
    config = settings([])
    deliverer = WebhookDeliverer(config, store=None, topology=None)  # type: ignore[arg-type]
    deliverer._http = webhook_client(config, Rebinding())
    now = datetime.now(UTC)
    event = JobEvent(job_id=JOB_ID, seq=1, status=JobStatus.RUNNING, phase=Phase.LOADING, progress=0.0, timestamp=now)
    hook = Webhook(url=f"http://hooks.example:{port}/hook", events=["job.running"])
    message = Message()
    logged: list[str] = []
    monkeypatch.setattr(webhooks.log, "warning", lambda name, **_: logged.append(name))
    try:
        await asyncio.wait_for(deliverer._deliver(message, event, hook), 10)  # type: ignore[arg-type]
    finally:
        await deliverer._http.close()
    assert message.acked.is_set() and hits == []
    assert len(checked) == 1 and logged == ["webhook_refused"]
