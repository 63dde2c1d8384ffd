"""Webhooks: signed (Standard Webhooks), filtered, retried with backoff, refused for private hosts."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from contextlib import asynccontextmanager

import pytest
from aiohttp import web
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from scripts.devstack import free_port_block, stop_pids
from tests.helpers import client, submit, watch

SECRET = "whsec_" + base64.b64encode(os.urandom(24)).decode()


@pytest.fixture
async def http():
    async with client() as session:
        yield session


class Receiver:
    """A webhook endpoint in the test process; answers 500 to the first try of chosen event types."""

    def __init__(self, fail_first: set[str], fail_always: bool = False) -> None:
        self.fail_first = set(fail_first)
        self.fail_always = fail_always
        self.calls: list[tuple[int, dict, str]] = []  # (status answered, headers, body)
        self.changed = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.text()
        kind = json.loads(body)["type"]
        status = 500 if kind in self.fail_first or self.fail_always else 200
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


@asynccontextmanager
async def serving(hook: Receiver):
    app = web.Application()
    app.router.add_post("/hook", hook.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port_block(1)
    await web.TCPSite(runner, "127.0.0.1", port).start()
    hook.url = f"http://127.0.0.1:{port}/hook"
    try:
        yield hook
    finally:
        await runner.cleanup()


@pytest.fixture
async def receiver():
    async with serving(Receiver(fail_first={"job.succeeded"})) as hook:
        yield hook


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


async def test_a_webhook_url_is_stripped_like_other_strings(stack, http, webhook_gateway) -> None:
    url = f"http://127.0.0.1:{free_port_block(1)}/hook"
    accepted = await submit(http, webhook_gateway, {"prompt": "spaced", "webhook_url": f"  {url}\n "})
    frames = await watch(http, webhook_gateway, accepted["job_id"], timeout=30)
    assert frames[-1]["job"]["webhook"]["url"] == url


@pytest.mark.parametrize(
    ("url", "rule"),
    [
        ("http://10.1.2.3/hook", "destination"),
        ("http://169.254.169.254/latest/meta-data", "destination"),  # cloud metadata, link-local
        ("ftp://example.com/hook", "url_scheme"),
        (f"http://{'a' * 70}.com/hook", "destination"),  # a host name IDNA cannot encode: not a 500
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


async def test_a_dead_receiver_does_not_hold_up_other_jobs_webhooks(stack, http, amqp_url, namespace) -> None:
    """One delivery slot, and a receiver that answers 500 to every attempt of one job's events:
    the pauses between those attempts wait in the broker's delay queues, not in the slot, so
    another job's webhook gets through while they are still being retried."""
    from tests.conftest import delete_test_namespace

    ns = f"{namespace}-hooks"
    gateway, gw = stack.start_gateway(
        "gateway-one-webhook-slot",
        VIDEOGEN_BROKER_NAMESPACE=ns,
        VIDEOGEN_WEBHOOK_SECRET=SECRET,
        VIDEOGEN_WEBHOOK_ALLOW_HOSTS="127.0.0.1",
        VIDEOGEN_WEBHOOK_CONCURRENCY="1",
        VIDEOGEN_WEBHOOK_MAX_ATTEMPTS="6",  # pauses 1, 2, 4, 8 and 16 s: the last try 31 s after the first
    )
    _, worker = stack.start_worker("worker-one-webhook-slot", ["ltx-tiny"], VIDEOGEN_BROKER_NAMESPACE=ns)
    try:
        async with serving(Receiver(set(), fail_always=True)) as dead, serving(Receiver(set())) as alive:
            noisy = await submit(
                http,
                gateway,
                {
                    "prompt": "nobody home",
                    "num_inference_steps": 4,
                    "webhook_url": dead.url,
                    "webhook_events": ["job.running", "job.succeeded"],
                },
            )
            await watch(http, gateway, noisy["job_id"])
            quiet = await submit(http, gateway, {"prompt": "someone home", "webhook_url": alive.url})
            await watch(http, gateway, quiet["job_id"])
            await alive.wait_for(lambda: any(status == 200 for status, _, _ in alive.calls), timeout=30)

            def tries() -> dict[str, int]:
                counts: dict[str, int] = {}
                for _, headers, _ in dead.calls:
                    counts[headers["webhook-id"]] = counts.get(headers["webhook-id"], 0) + 1
                return counts

            # When the quiet job's webhook got through, the noisy job's events were not all given up
            # (behind them, in the one slot, it would have waited for all of their six tries)...
            assert len(tries()) >= 3 and min(tries().values()) < 6, tries()
            # ...and they are still being retried.
            await dead.wait_for(lambda: max(tries().values()) >= 3, timeout=30)
    finally:
        stop_pids([gw.pid, worker.pid])
        await delete_test_namespace(amqp_url, ns)
