"""Webhooks: signed (Standard Webhooks), filtered, retried with backoff, refused for private hosts."""

from __future__ import annotations

import asyncio
import base64
import json
import os

import pytest
from aiohttp import web
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from scripts.devstack import free_port_block
from tests.helpers import client, submit, watch

SECRET = "whsec_" + base64.b64encode(os.urandom(24)).decode()


@pytest.fixture
async def http():
    async with client() as session:
        yield session


class Receiver:
    """A webhook endpoint in the test process; answers 500 to the first try of chosen event types."""

    def __init__(self, fail_first: set[str]) -> None:
        self.fail_first = set(fail_first)
        self.calls: list[tuple[int, dict, str]] = []  # (status answered, headers, body)
        self.changed = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.text()
        kind = json.loads(body)["type"]
        status = 500 if kind in self.fail_first else 200
        self.fail_first.discard(kind)
        self.calls.append((status, dict(request.headers), body))
        self.changed.set()
        return web.Response(status=status)

    async def wait_for(self, predicate, timeout: float = 60.0) -> None:
        async def loop() -> None:
            while not predicate():
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(loop(), timeout)


@pytest.fixture
async def receiver():
    hook = Receiver(fail_first={"job.succeeded"})
    app = web.Application()
    app.router.add_post("/hook", hook.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port_block(1)
    await web.TCPSite(runner, "127.0.0.1", port).start()
    hook.url = f"http://127.0.0.1:{port}/hook"
    yield hook
    await runner.cleanup()


@pytest.fixture(scope="module")
def webhook_gateway(stack):
    url, _ = stack.start_gateway(
        "gateway-webhooks", VIDEOGEN_WEBHOOK_SECRET=SECRET, VIDEOGEN_WEBHOOK_ALLOW_HOSTS="127.0.0.1"
    )
    return url


async def test_signed_filtered_and_retried_until_delivered(stack, http, receiver, webhook_gateway) -> None:
    accepted = await submit(
        http,
        webhook_gateway,
        {
            "prompt": "hooked",
            "num_inference_steps": 3,
            "webhook_url": receiver.url,
            "webhook_events": ["job.running", "job.succeeded"],
        },
    )
    frames = await watch(http, webhook_gateway, accepted["job_id"])
    running_seqs = {f["seq"] for f in frames if f["status"] == "running"}

    def delivered(kind: str) -> set[int]:
        return {
            json.loads(b)["data"]["seq"] for s, _, b in receiver.calls if s == 200 and json.loads(b)["type"] == kind
        }

    await receiver.wait_for(lambda: delivered("job.succeeded") and delivered("job.running") >= running_seqs)
    verifier = Webhook(SECRET)
    for _, headers, body in receiver.calls:
        payload = verifier.verify(body, {k.lower(): v for k, v in headers.items()})  # raises if forged
        assert payload["data"]["job_id"] == accepted["job_id"]
        assert headers["webhook-id"] == f"{accepted['job_id']}:{payload['data']['seq']}"
    kinds = [json.loads(b)["type"] for _, _, b in receiver.calls]
    assert set(kinds) == {"job.running", "job.succeeded"}, "queued is filtered out"
    succeeded = [(s, h["webhook-id"]) for s, h, b in receiver.calls if json.loads(b)["type"] == "job.succeeded"]
    assert [s for s, _ in succeeded] == [500, 200] and succeeded[0][1] == succeeded[1][1], "retried, same id"
    final = next(json.loads(b) for s, _, b in receiver.calls if s == 200 and json.loads(b)["type"] == "job.succeeded")
    assert final["data"]["job"]["result"]["url"]

    forged = dict(receiver.calls[0][1])
    forged["webhook-signature"] = "v1," + base64.b64encode(b"x" * 32).decode()
    with pytest.raises(WebhookVerificationError):
        verifier.verify(receiver.calls[0][2], {k.lower(): v for k, v in forged.items()})


async def test_an_unreachable_receiver_never_holds_the_job(stack, http, webhook_gateway) -> None:
    dead = f"http://127.0.0.1:{free_port_block(1)}/hook"
    accepted = await submit(http, webhook_gateway, {"prompt": "nobody listens", "webhook_url": dead})
    frames = await watch(http, webhook_gateway, accepted["job_id"], timeout=30)
    assert frames[-1]["status"] == "succeeded"


@pytest.mark.parametrize(
    ("url", "rule"),
    [
        ("http://10.1.2.3/hook", "destination"),
        ("http://169.254.169.254/latest/meta-data", "destination"),  # cloud metadata, link-local
        ("ftp://example.com/hook", "url_scheme"),
    ],
)
async def test_private_or_odd_webhook_urls_are_refused(stack, http, webhook_gateway, url, rule) -> None:
    gateway = webhook_gateway if rule != "url_scheme" else stack.gateway_url
    async with http.post(
        f"{gateway}/api/v1/generate/text-to-video", json={"prompt": "p", "webhook_url": url}
    ) as response:
        body = await response.json()
    assert response.status == 422, body
    detail = body["error"]["details"][0]
    assert (detail["field"], detail["rule"]) == ("webhook_url", rule)


async def test_webhooks_need_a_configured_secret(stack, http) -> None:
    async with http.post(
        f"{stack.gateway_url}/api/v1/generate/text-to-video",
        json={"prompt": "p", "webhook_url": "https://example.com/hook"},
    ) as response:
        body = await response.json()
    assert response.status == 422 and body["error"]["details"][0]["rule"] == "webhooks_disabled"
