"""Access control: API keys (401), each key sees only its own jobs (404 to others), per-key rate
limit and concurrent-job quota (429 with Retry-After), admin-only downloads, idempotency per key."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid

import aiohttp
import pytest

from tests.helpers import TOKENS, client, get_json, object_names, s3_client, sse_events, submit, until, watch

SLOW = {"prompt": "slow", "model": "ltx-slow", "width": 256, "height": 256, "num_frames": 65}
SHORT = {"prompt": "short", "model": "ltx-tiny", "num_inference_steps": 2}


@pytest.fixture
async def http():
    async with client() as session:
        yield session


@pytest.fixture
async def other():
    async with client(TOKENS["other"]) as session:
        yield session


@pytest.fixture
async def anonymous():
    async with client(None) as session:
        yield session


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer vg_not-a-key"}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer "}],
)
async def test_no_key_or_a_wrong_key_is_401(stack, anonymous, headers) -> None:
    for method, path in [
        ("GET", "/api/v1/jobs"),
        ("POST", "/api/v1/generate/text-to-video"),
        ("GET", "/api/v1/models"),
        ("GET", f"/api/v1/jobs/{uuid.uuid4()}"),
    ]:
        async with anonymous.request(
            method, stack.gateway_url + path, json={"prompt": "x"}, headers=headers
        ) as response:
            body = await response.json()
            assert response.status == 401, (path, body)
            assert body["error"]["code"] == "unauthorized"
            assert response.headers["WWW-Authenticate"].startswith("Bearer")


async def test_probes_need_no_key(stack, anonymous) -> None:
    assert (await get_json(anonymous, f"{stack.gateway_url}/health"))[0] == 200
    assert (await get_json(anonymous, f"{stack.gateway_url}/ready"))[0] == 200


async def test_a_key_sees_only_its_own_jobs(stack, http, other) -> None:
    mine = await submit(http, stack.gateway_url, SHORT)
    job_id = mine["job_id"]
    await watch(http, stack.gateway_url, job_id)
    base = stack.gateway_url
    # Every way to reach the job answers 404 to another key, as if it did not exist.
    for method, path in [
        ("GET", f"/api/v1/jobs/{job_id}"),
        ("GET", f"/api/v1/job/{job_id}"),
        ("POST", f"/api/v1/jobs/{job_id}/cancel"),
        ("DELETE", f"/api/v1/jobs/{job_id}"),
        ("GET", f"/api/v1/events?job_id={job_id}"),
    ]:
        async with other.request(method, base + path) as response:
            body = await response.json()
            assert response.status == 404 and body["error"]["code"] == "job_not_found", (path, body)
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await other.ws_connect(f"{base}/api/v1/ws", params={"job_id": job_id})
    assert refused.value.status == 404
    _, theirs = await get_json(other, f"{base}/api/v1/jobs?limit=100")
    assert job_id not in {j["job_id"] for j in theirs["jobs"]}
    _, listed = await get_json(http, f"{base}/api/v1/jobs?limit=100&model=ltx-tiny")
    assert job_id in {j["job_id"] for j in listed["jobs"]}
    # The owner still sees it, links included.
    status, job = await get_json(http, f"{base}/api/v1/jobs/{job_id}")
    assert status == 200 and job["result"]["url"]


async def test_a_stream_of_all_jobs_carries_only_the_callers_jobs(stack, http, other) -> None:
    async with other.ws_connect(f"{stack.gateway_url}/api/v1/ws", params={"all": "true"}) as theirs:
        mine = await submit(http, stack.gateway_url, SHORT)
        their_job = await submit(other, stack.gateway_url, SHORT)
        await watch(http, stack.gateway_url, mine["job_id"])
        seen: list[dict] = []

        async def read_until_their_job_ends() -> None:
            async for msg in theirs:
                seen.append(msg.json())
                if seen[-1]["job_id"] == their_job["job_id"] and seen[-1]["status"] == "succeeded":
                    return

        await asyncio.wait_for(read_until_their_job_ends(), 60)
    assert {f["job_id"] for f in seen} == {their_job["job_id"]}


async def test_outputs_path_is_the_owners_and_only_once_the_video_exists(stack, http, other, anonymous) -> None:
    accepted = await submit(http, stack.gateway_url, SLOW | {"num_inference_steps": 30})
    outputs = f"{stack.gateway_url}/outputs/{accepted['job_id']}.mp4"
    async with http.get(outputs, allow_redirects=False) as response:
        body = await response.json()
        assert response.status == 404 and body["error"]["code"] == "video_not_ready", body
        assert accepted["job_id"] in body["error"]["message"]
    async with other.get(outputs, allow_redirects=False) as response:
        assert response.status == 404 and (await response.json())["error"]["code"] == "job_not_found"
    async with anonymous.get(outputs, allow_redirects=False) as response:
        assert response.status == 401
    async with http.get(f"{stack.gateway_url}/outputs/{uuid.uuid4()}.mp4", allow_redirects=False) as response:
        assert response.status == 404 and (await response.json())["error"]["code"] == "job_not_found"
    async with http.post(f"{stack.gateway_url}/api/v1/jobs/{accepted['job_id']}/cancel") as response:
        assert response.status in (200, 202)


async def test_browsers_may_pass_the_key_as_access_token_on_streams(stack, http, anonymous) -> None:
    accepted = await submit(http, stack.gateway_url, SHORT)
    params = {"job_id": accepted["job_id"], "access_token": TOKENS["tester"]}
    frames = []
    async with anonymous.ws_connect(f"{stack.gateway_url}/api/v1/ws", params=params) as ws:
        async for msg in ws:
            frames.append(msg.json())
    assert frames[-1]["status"] == "succeeded"
    async with anonymous.get(f"{stack.gateway_url}/api/v1/events", params=params) as response:
        assert response.status == 200
        events = [data async for _, _, data in sse_events(response)]
    assert len(events) == len(frames)
    # Only the streams take it: elsewhere a token in the URL would end up in logs and histories.
    async with anonymous.get(
        f"{stack.gateway_url}/api/v1/jobs/{accepted['job_id']}", params={"access_token": TOKENS["tester"]}
    ) as response:
        assert response.status == 401


async def test_rate_limit_is_429_with_retry_after(stack) -> None:
    async with client(TOKENS["limited"]) as limited:  # 5 requests a second
        statuses, retry_after = [], []
        for _ in range(12):
            async with limited.get(f"{stack.gateway_url}/api/v1/models") as response:
                statuses.append(response.status)
                if response.status == 429:
                    assert (await response.json())["error"]["code"] == "rate_limited"
                    retry_after.append(int(response.headers["Retry-After"]))
        assert statuses[:5] == [200] * 5 and 429 in statuses, statuses
        assert set(retry_after) == {1}, retry_after  # a one-second window
        await asyncio.sleep(max(retry_after))  # the client waits as the header says; then it is served
        async with limited.get(f"{stack.gateway_url}/api/v1/models") as response:
            assert response.status == 200
    # Other keys are not held back by it.
    async with client() as tester, tester.get(f"{stack.gateway_url}/api/v1/models") as response:
        assert response.status == 200


async def test_concurrent_job_quota_is_429_until_a_job_ends(stack) -> None:
    async with client(TOKENS["quota2"]) as quota2:  # at most 2 jobs queued or running
        first = await submit(quota2, stack.gateway_url, SLOW | {"num_inference_steps": 200})
        second = await submit(quota2, stack.gateway_url, SLOW | {"num_inference_steps": 2})
        async with quota2.post(f"{stack.gateway_url}/api/v1/generate/text-to-video", json=SHORT) as response:
            body = await response.json()
            assert response.status == 429 and body["error"]["code"] == "quota_exceeded", body
            assert int(response.headers["Retry-After"]) > 0
        async with quota2.delete(f"{stack.gateway_url}/api/v1/jobs/{first['job_id']}") as response:
            assert response.status in (200, 202)
        await watch(quota2, stack.gateway_url, [first["job_id"], second["job_id"]], timeout=120)

        again: list[str] = []

        async def accepted_again() -> bool:
            async with quota2.post(f"{stack.gateway_url}/api/v1/generate/text-to-video", json=SHORT) as response:
                assert response.status in (202, 429), await response.text()
                if response.status == 202:
                    again.append((await response.json())["job_id"])
                return response.status == 202

        await until(accepted_again, 30, "a slot freed by the ended jobs")
        await watch(quota2, stack.gateway_url, again[0])  # leave the key with nothing running


async def test_markers_of_ended_jobs_never_hold_a_slot(stack, s3_store) -> None:
    """Markers whose job ended while no gateway saw it (or that lost their record) do not count,
    and are cleared when the key reaches its limit."""
    import io

    s3 = s3_client(s3_store)
    stale = [f"active/quota2/{uuid.uuid4()}" for _ in range(2)]
    for key in stale:
        s3.put_object(s3_store.bucket, key, io.BytesIO(b""), 0)
    async with client(TOKENS["quota2"]) as quota2:
        jobs = [await submit(quota2, stack.gateway_url, SLOW | {"num_inference_steps": 200}) for _ in range(2)]
        async with quota2.post(f"{stack.gateway_url}/api/v1/generate/text-to-video", json=SHORT) as response:
            assert response.status == 429, "the two live jobs fill the quota; the two stale markers do not count"
        remaining = object_names(s3_store, "active/quota2/")
        assert not remaining & set(stale)
        for job in jobs:
            async with quota2.delete(f"{stack.gateway_url}/api/v1/jobs/{job['job_id']}") as response:
                assert response.status in (200, 202)
        await watch(quota2, stack.gateway_url, [j["job_id"] for j in jobs], timeout=120)


async def test_model_downloads_need_an_admin_key(stack, other) -> None:
    async with other.post(f"{stack.gateway_url}/api/v1/models/download", json={"model": "ltx-tiny"}) as response:
        body = await response.json()
        assert response.status == 403 and body["error"]["code"] == "forbidden", body


async def test_idempotency_keys_belong_to_their_api_key(stack, http, other) -> None:
    headers = {"Idempotency-Key": f"shared-{uuid.uuid4()}"}
    body = SHORT | {"seed": 7}
    async with http.post(f"{stack.gateway_url}/api/v1/generate/text-to-video", json=body, headers=headers) as r:
        mine = await r.json()
    async with other.post(f"{stack.gateway_url}/api/v1/generate/text-to-video", json=body, headers=headers) as r:
        theirs = await r.json()
        assert r.status == 202 and "Idempotent-Replayed" not in r.headers
    assert mine["job_id"] != theirs["job_id"]


async def test_concurrent_first_uses_of_an_idempotency_key_make_one_job(stack, http) -> None:
    second_gateway, _ = stack.start_gateway("gateway-idempotency")
    headers = {"Idempotency-Key": f"race-{uuid.uuid4()}"}

    async def post(gateway: str) -> tuple[int, str]:
        async with http.post(f"{gateway}/api/v1/generate/text-to-video", json=SHORT, headers=headers) as response:
            return response.status, (await response.json())["job_id"]

    results = await asyncio.gather(*(post(g) for g in [stack.gateway_url, second_gateway] * 4))
    assert {status for status, _ in results} == {202}
    job_ids = {job_id for _, job_id in results}
    assert len(job_ids) == 1, f"{len(job_ids)} jobs for one key"
    await watch(http, stack.gateway_url, job_ids.pop())


def test_a_gateway_without_keys_refuses_to_start(stack) -> None:
    env = {k: v for k, v in stack.env.items() if k != "VIDEOGEN_API_KEYS_FILE"}
    env.pop("VIDEOGEN_AUTH_DISABLED", None)
    result = subprocess.run(
        [sys.executable, "-m", "gateway.main"], env=env, capture_output=True, text=True, timeout=60, cwd=os.getcwd()
    )
    assert result.returncode == 2
    assert "VIDEOGEN_API_KEYS_FILE" in result.stderr and "VIDEOGEN_AUTH_DISABLED" in result.stderr


async def test_a_key_holds_at_most_its_number_of_streams_open(stack) -> None:
    """Past VIDEOGEN_MAX_STREAMS_PER_KEY a key's next stream is 429 too_many_streams, on WebSocket
    and SSE alike, while other keys' streams open; once one closes, another may open."""
    gateway, _ = stack.start_gateway("gateway-stream-cap", VIDEOGEN_MAX_STREAMS_PER_KEY="2")
    async with client() as mine, client(TOKENS["other"]) as theirs:
        first = await mine.ws_connect(f"{gateway}/api/v1/ws?all=true")
        second = await mine.get(f"{gateway}/api/v1/events?all=true")
        assert second.status == 200
        async with mine.get(f"{gateway}/api/v1/events?all=true", timeout=aiohttp.ClientTimeout(total=10)) as third:
            payload = await third.json()  # (a stream that opened would never end: the timeout fails it)
        assert (third.status, payload["error"]["code"]) == (429, "too_many_streams"), payload
        assert third.headers["Retry-After"] == "5" and "VIDEOGEN_MAX_STREAMS_PER_KEY" in payload["error"]["message"]
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await mine.ws_connect(f"{gateway}/api/v1/ws?all=true")
        assert refused.value.status == 429
        other = await theirs.ws_connect(f"{gateway}/api/v1/ws?all=true")
        await first.close()

        async def opens() -> bool:
            async with mine.get(f"{gateway}/api/v1/events?all=true") as again:
                return again.status == 200

        await until(opens, 10, "a stream opens once one of the key's closed")
        second.close()
        await other.close()
