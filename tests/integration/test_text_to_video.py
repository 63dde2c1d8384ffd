"""Text-to-video end to end: real gateway and worker processes, real RabbitMQ, real S3 store."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from tests.helpers import client, download, fetch_link, get_json, submit, watch
from worker.encode import probe_mp4

TERMINAL = {"succeeded", "failed", "cancelled"}


@pytest.fixture
async def http():
    async with client() as session:
        yield session


async def test_job_runs_end_to_end(stack, http, tmp_path: Path) -> None:
    request = {
        "prompt": "a lighthouse in a storm",
        "width": 64,
        "height": 32,
        "num_frames": 17,
        "fps": 12,
        "num_inference_steps": 3,
        "seed": 7,
    }
    accepted = await submit(http, stack.gateway_url, request)
    assert accepted["status"] == "queued"
    assert accepted["request"] | request == accepted["request"]  # every field as sent, defaults filled

    frames = await watch(http, stack.gateway_url, accepted["job_id"])

    seqs = [f["seq"] for f in frames]
    assert seqs == list(range(len(frames))), "events arrive in order, from the first, with no gap"
    assert all(f["job_id"] == accepted["job_id"] for f in frames)
    phases = [f["phase"] for f in frames]
    assert phases == [
        "queued",
        "loading",
        "denoising",
        "denoising",
        "denoising",
        "decoding",
        "encoding",
        "uploading",
        "succeeded",
    ]
    assert [f["step"] for f in frames if f["phase"] == "denoising"] == [1, 2, 3]
    progress = [f["progress"] for f in frames]
    assert progress == sorted(progress) and progress[-1] == 1.0
    assert [f["status"] for f in frames][-1] == "succeeded"
    assert all("job" not in f for f in frames[:-1])

    final = frames[-1]["job"]
    assert final["status"] == "succeeded" and final["request"]["seed"] == 7
    # Seconds per phase: each measured, and together no more than the job's life.
    timings = final["timings"]
    assert set(timings) == {"queued", "load", "denoise", "decode", "encode", "upload"}
    assert all(v is not None and v >= 0 for v in timings.values()), timings
    assert timings["denoise"] > 0
    from datetime import datetime

    life = (datetime.fromisoformat(final["finished_at"]) - datetime.fromisoformat(final["created_at"])).total_seconds()
    assert sum(timings.values()) <= life + 0.05, (timings, life)
    result = final["result"]
    assert (result["num_frames"], result["width"], result["height"], result["fps"]) == (17, 64, 32, 12)

    video = await download(result["url"], tmp_path / "out.mp4")
    assert video.stat().st_size == result["bytes"]
    info = probe_mp4(video)
    assert (info.num_frames, info.width, info.height, info.fps) == (17, 64, 32, 12)
    assert (info.codec, info.pix_fmt) == ("h264", "yuv420p")
    # The seed's static-file path: a redirect to the same video, through a fresh presigned link.
    outputs = f"{stack.gateway_url}/outputs/{accepted['job_id']}.mp4"
    async with http.get(outputs, allow_redirects=False) as response:
        assert response.status == 302, await response.text()
        location = response.headers["Location"]
    assert (await download(location, tmp_path / "again.mp4")).read_bytes() == video.read_bytes()
    # A HEAD is redirected to a link signed for HEAD (the store refuses a GET link to a HEAD); the
    # key does not follow the redirect to the store's origin.
    for path in (outputs, f"{stack.gateway_url}/v1/videos/{accepted['job_id']}/content"):
        async with http.head(path, allow_redirects=True) as response:
            assert response.status == 200, (path, response.status, response.headers)
            assert int(response.headers["Content-Length"]) == result["bytes"]
            assert response.headers["Content-Type"] == "video/mp4"
    head = video.read_bytes()[:4096]
    assert head.find(b"moov") != -1 and head.find(b"moov") < max(head.find(b"mdat"), 4096), "faststart"

    # The job record: same state through both paths, timestamps set, presigned link fresh.
    for path in (f"/api/v1/jobs/{accepted['job_id']}", f"/api/v1/job/{accepted['job_id']}"):
        status, job = await get_json(http, stack.gateway_url + path)
        assert status == 200
        assert job["status"] == "succeeded" and job["progress"] == 1.0 and job["seq"] == seqs[-1]
        assert job["created_at"] <= job["started_at"] <= job["finished_at"]
        assert job["result"]["bytes"] == result["bytes"] and job["error"] is None


async def test_defaults_come_from_the_model_registry(stack, http) -> None:
    accepted = await submit(http, stack.gateway_url, {"prompt": "defaults"})
    req = accepted["request"]
    assert req["model"] == "ltx-tiny"
    assert (req["width"], req["height"], req["num_frames"], req["fps"], req["num_inference_steps"]) == (32, 32, 9, 8, 2)
    assert isinstance(req["seed"], int)
    frames = await watch(http, stack.gateway_url, accepted["job_id"])
    assert frames[-1]["status"] == "succeeded"


async def test_late_watcher_on_another_gateway_gets_the_whole_history(stack, http) -> None:
    accepted = await submit(http, stack.gateway_url, {"prompt": "late"})
    live = await watch(http, stack.gateway_url, accepted["job_id"])
    # A second gateway never saw this job's events: it replays them from the job's record.
    other, _ = stack.start_gateway("gateway-late")
    replayed = await watch(http, other, accepted["job_id"])
    assert [_without_job(f) for f in replayed] == [_without_job(f) for f in live]
    assert replayed[-1]["job"]["result"]["url"]


def _without_job(frame: dict) -> dict:
    return {k: v for k, v in frame.items() if k != "job"}


async def test_record_survives_gateway_restart(stack, http) -> None:
    first, proc = stack.start_gateway("gateway-a")
    accepted = await submit(http, first, {"prompt": "restart"})
    await watch(http, first, accepted["job_id"])
    from scripts.devstack import stop_pid

    stop_pid(proc.pid)
    second, _ = stack.start_gateway("gateway-b")
    status, job = await get_json(http, f"{second}/api/v1/jobs/{accepted['job_id']}")
    assert status == 200 and job["status"] == "succeeded"
    assert (await fetch_link(job["result"]["url"]))[0] == 200


async def test_unknown_job_is_404(stack, http) -> None:
    for job_id in (
        "0b6f2ad6-4f7e-4c55-9b1f-3f0a2c1d9e11",
        "0b6f2ad6-4f7e-4c55-9b1f-3f0a2c1d9e11%0A",
        "not-a-job",
        "..%2F..%2Fetc",
    ):
        status, body = await get_json(http, f"{stack.gateway_url}/api/v1/jobs/{job_id}")
        assert status == 404 and body["error"]["code"] == "job_not_found"
    async with http.get(
        f"{stack.gateway_url}/api/v1/ws", params={"job_id": "0b6f2ad6-4f7e-4c55-9b1f-3f0a2c1d9e11"}
    ) as response:
        assert response.status == 404 and (await response.json())["error"]["code"] == "job_not_found"
    async with http.get(f"{stack.gateway_url}/api/v1/ws") as response:
        assert response.status == 400 and (await response.json())["error"]["code"] == "missing_parameter"


async def test_health_and_readiness(stack, http) -> None:
    assert await get_json(http, f"{stack.gateway_url}/health") == (200, {"status": "ok"})
    status, body = await get_json(http, f"{stack.gateway_url}/ready")
    assert (status, body["broker"], body["store"]) == (200, "ok", "ok")
    status, body = await get_json(http, f"{stack.worker_health_url}/ready")
    assert status == 200 and body["models"] == ["ltx-tiny"]


async def test_ready_is_503_when_the_store_is_unreachable(stack, http) -> None:
    from scripts.devstack import free_port_block

    dead_store = f"127.0.0.1:{free_port_block(1)}"
    gateway, _ = stack.start_gateway("gateway-no-store", wait_for="/health", VIDEOGEN_S3_ENDPOINT=dead_store)
    assert (await get_json(http, f"{gateway}/health"))[0] == 200
    status, body = await get_json(http, f"{gateway}/ready")
    assert (status, body["broker"], body["store"]) == (503, "ok", "unreachable")
    async with http.post(f"{gateway}/api/v1/generate/text-to-video", json={"prompt": "x"}) as response:
        assert response.status == 503 and (await response.json())["error"]["code"] == "store_unavailable"
        assert response.headers["Retry-After"]
    # Every route that reads the store answers the same way, never 500.
    job_id = str(uuid.uuid4())
    for method, path in [
        ("GET", f"/api/v1/jobs/{job_id}"),
        ("GET", "/api/v1/jobs"),
        ("POST", f"/api/v1/jobs/{job_id}/cancel"),
        ("GET", f"/api/v1/events?job_id={job_id}"),
        ("GET", f"/v1/videos/{job_id}"),
    ]:
        async with http.request(method, f"{gateway}{path}") as response:
            body = await response.json()
            assert response.status == 503 and response.headers["Retry-After"], (path, body)
            code = body["error"]["code"]
            assert code == "store_unavailable", (path, body)


async def test_idempotency_key_returns_the_original_job(stack, http) -> None:
    url = f"{stack.gateway_url}/api/v1/generate/text-to-video"
    body = {"prompt": "only once", "num_inference_steps": 2}
    headers = {"Idempotency-Key": f"order-{os.urandom(4).hex()}"}
    async with http.post(url, json=body, headers=headers) as first:
        original = await first.json()
        assert first.status == 202 and "Idempotent-Replayed" not in first.headers
    async with http.post(url, json=body, headers=headers) as again:
        replay = await again.json()
        assert again.status == 202 and again.headers["Idempotent-Replayed"] == "true"
    assert replay["job_id"] == original["job_id"] and replay["request"] == original["request"]
    async with http.post(url, json=body | {"prompt": "something else"}, headers=headers) as other:
        payload = await other.json()
        assert other.status == 422
        assert payload["error"]["details"][0] == {
            "field": "Idempotency-Key",
            "rule": "reused_with_different_body",
            "message": payload["error"]["message"],
        }
    async with http.post(url, json=body) as without_key:
        assert (await without_key.json())["job_id"] != original["job_id"]
    async with http.post(url, json=body, headers={"Idempotency-Key": "k" * 300}) as bad:
        assert bad.status == 400 and (await bad.json())["error"]["code"] == "bad_header"


async def test_cors_preflight_and_headers(stack, http) -> None:
    url = f"{stack.gateway_url}/api/v1/generate/text-to-video"
    preflight = {
        "Origin": "https://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,idempotency-key",
    }
    async with http.options(url, headers=preflight) as response:
        assert response.status == 200
        assert response.headers["Access-Control-Allow-Origin"] in ("*", "https://app.example")
    async with http.post(url, json={"prompt": "from a page"}, headers={"Origin": "https://app.example"}) as response:
        assert response.status == 202 and "Access-Control-Allow-Origin" in response.headers
        assert "Location" in response.headers["Access-Control-Expose-Headers"]
    # Cacheable answers say they depend on the origin (their CORS headers do), with an Origin or not.
    for path, origin in (("/static/app.js", {"Origin": "https://app.example"}), ("/openapi.json", {})):
        async with http.get(f"{stack.gateway_url}{path}", headers=origin) as response:
            assert response.status == 200 and "Origin" in response.headers.get("Vary", ""), dict(response.headers)
    only, _ = stack.start_gateway("gateway-cors", VIDEOGEN_CORS_ALLOW_ORIGINS="https://app.example")
    async with http.get(f"{only}/api/v1/models", headers={"Origin": "https://evil.example"}) as response:
        assert response.status == 200 and "Access-Control-Allow-Origin" not in response.headers
    # A refused preflight says why.
    async with http.options(
        url.replace(stack.gateway_url, only), headers=preflight | {"Origin": "https://evil.example"}
    ) as response:
        body = await response.json()
    assert response.status == 403 and body["error"]["code"] == "forbidden", body
    assert "origin 'https://evil.example' is not allowed" in body["error"]["message"]


async def test_presigned_links_expire(stack, http, tmp_path) -> None:
    import asyncio

    short, _ = stack.start_gateway("gateway-short-links", VIDEOGEN_PRESIGN_EXPIRY_S="2")
    accepted = await submit(http, short, {"prompt": "fleeting"})
    frames = await watch(http, short, accepted["job_id"])
    url = frames[-1]["job"]["result"]["url"]
    assert (await fetch_link(url))[0] == 200
    deadline = asyncio.get_running_loop().time() + 30
    while True:  # poll until the store refuses it: the signature's clock, not ours, decides
        if (await fetch_link(url))[0] == 403:
            break
        assert asyncio.get_running_loop().time() < deadline, "the store still serves an expired link"
        await asyncio.sleep(0.25)
