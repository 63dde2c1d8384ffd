"""All three modes on both families through the gateway; models, routing, downloads, expiry."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pytest

from common.topology import Topology, to_amqp
from schemas.messages import JobDropped, decode
from scripts import devstack
from tests.helpers import (
    bucket_of,
    client,
    download,
    get_json,
    mp4_bytes,
    object_names,
    png_bytes,
    s3_client,
    submit,
    until,
    watch,
)
from worker.encode import probe_mp4


@pytest.fixture
async def http():
    async with client() as session:
        yield session


IMAGE = png_bytes(96, 48)
VIDEO = mp4_bytes(21, 64, 32)

COMBOS = [
    # model, mode, transport, worker expected to run it
    ("ltx-tiny", "text-to-video", "json", "worker-ltx"),
    ("ltx-tiny", "image-to-video", "multipart", "worker-ltx"),
    ("ltx-tiny", "video-to-video", "multipart", "worker-ltx"),
    ("wan-tiny", "text-to-video", "json", "worker-wan"),
    ("wan-i2v-tiny", "image-to-video", "json", "worker-wan"),
    ("wan-tiny", "video-to-video", "json", "worker-wan"),
]


@pytest.mark.parametrize(("model", "mode", "transport", "worker"), COMBOS, ids=[f"{c[0]}-{c[1]}" for c in COMBOS])
async def test_mode_end_to_end(stack, http, tmp_path: Path, model, mode, transport, worker) -> None:
    body = {
        "prompt": "a paper boat on a river",
        "model": model,
        "width": 64,
        "height": 32,
        "num_frames": 17,
        "fps": 10,
        "num_inference_steps": 3,
        "seed": 3,
    }
    files = {}
    if mode != "text-to-video":
        field, data = ("image", IMAGE) if mode == "image-to-video" else ("video", VIDEO)
        if transport == "multipart":
            files[field] = data
        else:
            body[field] = base64.b64encode(data).decode()
    if mode == "video-to-video":
        body["strength"] = 0.7
    accepted = await submit(http, stack.gateway_url, body, mode=mode, files=files)
    assert (accepted["mode"], accepted["model"], accepted["workers"]) == (mode, model, 1)

    frames = await watch(http, stack.gateway_url, accepted["job_id"])
    assert [f["seq"] for f in frames] == list(range(len(frames)))
    final = frames[-1]["job"]
    assert final["status"] == "succeeded", final["error"]
    denoise = [f for f in frames if f["phase"] == "denoising"]
    assert [f["step"] for f in denoise] == list(range(1, denoise[-1]["total_steps"] + 1))

    status, record = await get_json(http, f"{stack.gateway_url}/api/v1/jobs/{accepted['job_id']}")
    assert status == 200 and record["mode"] == mode
    assert record["request"]["strength"] == (0.7 if mode == "video-to-video" else None)
    video = await download(final["result"]["url"], tmp_path / "out.mp4")
    info = probe_mp4(video)
    assert (info.num_frames, info.width, info.height, info.fps) == (17, 64, 32, 10)
    # Routing: each model's jobs reach only the worker that serves it.
    worker_seen = await _stored_worker(stack, accepted["job_id"])
    assert worker_seen == worker


async def _stored_worker(stack, job_id: str) -> str:
    response = s3_client(stack).get_object(bucket_of(stack), f"jobs/{job_id}/job.json")
    try:
        return json.loads(response.read())["worker"]
    finally:
        response.close()


async def test_inputs_are_stored_under_the_job_not_the_client_name(stack, http) -> None:
    accepted = await submit(
        http,
        stack.gateway_url,
        {"prompt": "p", "model": "ltx-tiny"},
        mode="image-to-video",
        files={"image": png_bytes(32, 32, fmt="JPEG")},
    )
    await watch(http, stack.gateway_url, accepted["job_id"])
    names = object_names(stack, f"jobs/{accepted['job_id']}/")
    job = accepted["job_id"]
    assert names == {f"jobs/{job}/job.json", f"jobs/{job}/input/image.jpg", f"jobs/{job}/video.mp4"}


BAD_UPLOADS = [
    # mode, body extras, files, status, field, rule
    ("image-to-video", {}, {}, 422, "image", "missing"),
    ("image-to-video", {}, {"image": b"definitely not an image"}, 422, "image", "decodable"),
    ("image-to-video", {}, {"image": png_bytes(32, 32, fmt="GIF")}, 422, "image", "format"),
    ("image-to-video", {}, {"image": png_bytes(4200, 4200)}, 422, "image", "max_pixels"),
    ("image-to-video", {"image": "@@not-base64@@"}, {}, 422, "image", "base64"),
    # Empty: a JSON string like any other (spaces stripped), or no bytes in a file part or data URL.
    ("image-to-video", {"image": ""}, {}, 422, "image", "string_too_short"),
    ("image-to-video", {"image": "data:image/png;base64,"}, {}, 422, "image", "empty"),
    ("image-to-video", {}, {"image": b""}, 422, "image", "empty"),
    ("video-to-video", {"video": "  "}, {}, 422, "video", "string_too_short"),
    ("video-to-video", {}, {"video": b""}, 422, "video", "empty"),
    ("video-to-video", {}, {"video": b"\x00\x00\x00\x18ftypmp42 but not really"}, 422, "video", "decodable"),
    # A playlist of files on the server's disk is not a container: never opened.
    (
        "video-to-video",
        {},
        {"video": b"ffconcat version 1.0\n" + b"file docs/performance.png\n" * 9},
        422,
        "video",
        "format",
    ),
    ("video-to-video", {}, {"video": b"not a video" * 50}, 422, "video", "format"),
    ("video-to-video", {"num_frames": 25}, {"video": mp4_bytes(21, 64, 32)}, 422, "video", "min_frames"),
    ("video-to-video", {"strength": 1.5}, {"video": mp4_bytes(9, 64, 32)}, 422, "strength", "less_than_equal"),
    ("video-to-video", {"model": "wan-i2v-tiny"}, {"video": mp4_bytes(9, 64, 32)}, 422, "model", "supports_mode"),
    ("image-to-video", {"model": "wan-tiny"}, {"image": png_bytes(32, 32)}, 422, "model", "supports_mode"),
    ("image-to-video", {"model": "nope"}, {"image": png_bytes(32, 32)}, 422, "model", "known_model"),
    ("image-to-video", {"colour": "red"}, {"image": png_bytes(32, 32)}, 422, "colour", "extra_forbidden"),
]


@pytest.mark.parametrize(
    ("mode", "extra", "files", "status", "field", "rule"),
    BAD_UPLOADS,
    ids=[f"{c[0]}-{c[4]}-{c[5]}" for c in BAD_UPLOADS],
)
async def test_bad_uploads_are_refused_with_the_field_named(
    stack, http, mode, extra, files, status, field, rule
) -> None:
    url = f"{stack.gateway_url}/api/v1/generate/{mode}"
    body = {"prompt": "p", "model": "ltx-tiny"} | extra
    if files:
        form = aiohttp.FormData()
        for name, value in body.items():
            form.add_field(name, str(value))
        for name, data in files.items():
            form.add_field(name, data, filename="x.bin")
        request = http.post(url, data=form)
    else:
        request = http.post(url, json=body)
    async with request as response:
        payload = await response.json()
    assert response.status == status, payload
    detail = next(d for d in payload["error"]["details"] if d["field"] == field)
    assert detail["rule"] == rule and field in detail["message"]


async def test_upload_over_the_limit_is_413(stack, http) -> None:
    gateway, _ = stack.start_gateway("gateway-small-upload", VIDEOGEN_MAX_UPLOAD_BYTES="20000")
    form = aiohttp.FormData()
    form.add_field("prompt", "p")
    form.add_field("image", png_bytes(128, 128), filename="big.png")
    async with http.post(f"{gateway}/api/v1/generate/image-to-video", data=form) as response:
        assert response.status == 413 and (await response.json())["error"]["code"] == "body_too_large"


async def test_models_list_live_workers(stack, http) -> None:
    status, body = await get_json(http, f"{stack.gateway_url}/api/v1/models")
    assert status == 200 and body["default_model"] == "ltx-tiny"
    models = {m["id"]: m for m in body["models"]}
    assert {"ltx-video", "wan2-1-t2v-1-3b", "wan2-1-i2v-14b-480p", "ltx-tiny", "wan-tiny", "wan-i2v-tiny"} <= set(
        models
    )
    assert models["ltx-tiny"]["workers"] == 1 and models["wan-tiny"]["workers"] == 1
    assert models["ltx-video"]["workers"] == 0
    assert models["ltx-video"]["source"] == {"repo": "Lightricks/LTX-Video", "revision": None}
    # Where a client may ask for the fast tier: every mode, one mode, none.
    assert models["ltx-video"]["fast_tier_modes"] == models["ltx-video"]["modes"]
    assert models["wan2-1-t2v-1-3b"]["fast_tier_modes"] == ["text-to-video"]
    assert models["ltx-tiny"]["fast_tier_modes"] == []


async def test_model_info(stack, http) -> None:
    status, info = await get_json(http, f"{stack.gateway_url}/api/v1/model/info?model=wan-tiny")
    assert status == 200
    assert info["rules"] == {"size_multiple": 16, "num_frames": "4k+1"}
    assert info["modes"] == ["text-to-video", "video-to-video"] and info["defaults"]["fps"] == 16
    assert info["download_workers"] == stack.live_workers()
    status, info = await get_json(http, f"{stack.gateway_url}/api/v1/model/info")
    assert status == 200 and info["id"] == "ltx-tiny"
    status, body = await get_json(http, f"{stack.gateway_url}/api/v1/model/info?model=sora")
    assert status == 404 and body["error"]["code"] == "model_not_found"


async def test_wan_size_rules_are_checked_per_model(stack, http) -> None:
    async with http.post(
        f"{stack.gateway_url}/api/v1/generate/text-to-video",
        json={"prompt": "p", "model": "wan-tiny", "width": 40, "num_frames": 10},
    ) as response:
        payload = await response.json()
    assert response.status == 422
    rules = {d["field"]: d["rule"] for d in payload["error"]["details"]}
    assert rules == {"width": "multiple_of_16", "num_frames": "4k+1"}
    assert "32 or 48" in payload["error"]["message"] and "9 or 13" in payload["error"]["message"]


async def test_download_of_a_local_model_succeeds(stack, http) -> None:
    async with http.post(f"{stack.gateway_url}/api/v1/models/download", json={"model": "wan-tiny"}) as response:
        accepted = await response.json()
    assert response.status == 202 and accepted["mode"] == "download" and accepted["workers"] == stack.live_workers()
    frames = await watch(http, stack.gateway_url, accepted["job_id"])
    assert [f["phase"] for f in frames] == ["queued", "downloading", "succeeded"]
    assert "local folder" in frames[-1]["job"]["message"]
    for method, path in (("GET", ""), ("GET", "/content"), ("DELETE", "")):  # a download is no video
        async with http.request(method, f"{stack.gateway_url}/v1/videos/{accepted['job_id']}{path}") as response:
            assert response.status == 404, (method, path)


async def test_download_from_an_unreachable_hub_fails_clearly(stack, http) -> None:
    async with http.post(f"{stack.gateway_url}/api/v1/models/download", json={"model": "ltx-video"}) as response:
        accepted = await response.json()
    frames = await watch(http, stack.gateway_url, accepted["job_id"])
    job = frames[-1]["job"]
    assert job["status"] == "failed" and job["error"]["code"] == "download_failed"
    assert "Lightricks/LTX-Video" in job["error"]["message"]


async def test_download_of_an_unknown_model_is_422(stack, http) -> None:
    async with http.post(f"{stack.gateway_url}/api/v1/models/download", json={"model": "sora"}) as response:
        assert response.status == 422
        assert (await response.json())["error"]["details"][0]["field"] == "model"


async def test_job_for_a_model_without_workers_is_accepted_then_expires(stack, http) -> None:
    """Also when a job of the same model with a longer limit (the registry's 3600 s, before it was
    lowered) was queued first: its check must not hold this one's back."""
    earlier = await submit(http, stack.gateway_url, {"prompt": "a longer limit", "model": "ltx-video"})
    gateway, _ = stack.start_gateway(
        "gateway-short-queue", VIDEOGEN_MODEL_OVERRIDES=json.dumps({"ltx-video": {"max_queue_s": 3}})
    )
    accepted = await submit(http, gateway, {"prompt": "nobody home", "model": "ltx-video"})
    assert accepted["workers"] == 0
    frames = await watch(http, gateway, accepted["job_id"], timeout=30)
    job = frames[-1]["job"]
    assert (job["status"], job["error"]["code"]) == ("failed", "expired")
    assert "3 s" in job["error"]["message"]
    status, record = await get_json(http, f"{stack.gateway_url}/api/v1/jobs/{accepted['job_id']}")
    assert record["status"] == "failed" and record["error"]["code"] == "expired"
    status, record = await get_json(http, f"{stack.gateway_url}/api/v1/jobs/{earlier['job_id']}")
    assert record["status"] == "queued", record
    async with http.post(f"{stack.gateway_url}/api/v1/jobs/{earlier['job_id']}/cancel") as response:
        assert response.status == 200, await response.text()


async def test_queue_depth_and_workers_are_live(stack, http) -> None:
    first = await submit(http, stack.gateway_url, {"prompt": "one", "model": "wan2-1-t2v-1-3b"})
    second = await submit(http, stack.gateway_url, {"prompt": "two", "model": "wan2-1-t2v-1-3b"})
    assert (first["workers"], first["queue_depth"]) == (0, 1)
    assert (second["workers"], second["queue_depth"]) == (0, 2)
    status, info = await get_json(http, f"{stack.gateway_url}/api/v1/model/info?model=wan2-1-t2v-1-3b")
    assert (info["workers"], info["queue_depth"]) == (0, 2)


async def test_large_base64_json_body_is_read_whole(stack, http, tmp_path: Path) -> None:
    video = mp4_bytes(33, 256, 256)
    assert len(video) > 1_000_000  # arrives in many chunks
    body = {"prompt": "big", "model": "ltx-tiny", "num_frames": 9, "video": base64.b64encode(video).decode()}
    accepted = await submit(http, stack.gateway_url, body, mode="video-to-video")
    frames = await watch(http, stack.gateway_url, accepted["job_id"])
    assert frames[-1]["status"] == "succeeded"


async def test_video_to_video_needs_at_least_one_denoising_step(stack, http) -> None:
    form = aiohttp.FormData()
    for name, value in {"prompt": "p", "model": "wan-tiny", "num_inference_steps": 2, "strength": 0.4}.items():
        form.add_field(name, str(value))
    form.add_field("video", mp4_bytes(9, 64, 32), filename="in.mp4")
    async with http.post(f"{stack.gateway_url}/api/v1/generate/video-to-video", data=form) as response:
        payload = await response.json()
    assert response.status == 422
    assert payload["error"]["details"][0]["field"] == "strength"
    assert payload["error"]["details"][0]["rule"] == "denoising_steps"


async def test_a_full_queue_refuses_new_jobs_with_503_and_retry_after(stack, http) -> None:
    from tests.conftest import EXTRA_MODELS

    overrides = json.dumps({**EXTRA_MODELS, "wan2-1-i2v-14b-480p": {"max_queue_depth": 2}})
    gateway, _ = stack.start_gateway("gateway-small-queue", VIDEOGEN_MODEL_OVERRIDES=overrides)
    body = {"prompt": "p", "model": "wan2-1-i2v-14b-480p", "image": base64.b64encode(IMAGE).decode()}
    for _ in range(2):
        await submit(http, gateway, body, mode="image-to-video")
    async with http.post(f"{gateway}/api/v1/generate/image-to-video", json=body) as response:
        payload = await response.json()
        assert response.status == 503 and payload["error"]["code"] == "queue_full"
        assert int(response.headers["Retry-After"]) >= 5


async def test_jobs_that_ended_while_queued_do_not_fill_the_queue(stack, http, amqp_url) -> None:
    """Their messages stay in the queue until a worker drops them (none serves this model): the
    gateway counts them apart, and a worker's drop notice tells it when one has left."""
    from tests.conftest import EXTRA_MODELS, delete_test_namespace

    namespace = f"{stack.env['VIDEOGEN_BROKER_NAMESPACE']}-ended"  # queues of this test's own
    overrides = json.dumps({**EXTRA_MODELS, "ltx-video": {"max_queue_depth": 2}})
    gateway, gateway_proc = stack.start_gateway(
        "gateway-ended-in-queue", VIDEOGEN_BROKER_NAMESPACE=namespace, VIDEOGEN_MODEL_OVERRIDES=overrides
    )
    body = {"prompt": "p", "model": "ltx-video", "width": 256, "height": 256, "num_frames": 9}

    async def queue_depth() -> int:
        _, info = await get_json(http, f"{gateway}/api/v1/model/info?model=ltx-video")
        return info["queue_depth"]

    try:
        _, info = await get_json(http, f"{gateway}/api/v1/model/info?model=ltx-video")
        assert info["max_queue_depth"] == 2  # the limit, overridden, is shown
        cancelled = [(await submit(http, gateway, body))["job_id"] for _ in range(2)]
        for job_id in cancelled:
            async with http.post(f"{gateway}/api/v1/jobs/{job_id}/cancel") as response:
                assert response.status == 200
        await until(lambda: _equals(queue_depth(), 0), what="cancelled jobs no longer counted")
        later = [await submit(http, gateway, body) for _ in range(2)]
        assert [(a["queue_depth"], a["queue_position"]) for a in later] == [(1, 0), (2, 1)]
        async with http.post(f"{gateway}/api/v1/generate/text-to-video", json=body) as response:
            assert response.status == 503 and (await response.json())["error"]["code"] == "queue_full"

        # What a worker does with the first message: takes it, finds the job cancelled, acknowledges
        # it and sends the drop notice. Until the notice arrives the gateway counts both cancelled
        # jobs apart though one has left (one waiting job too few); after it, exactly.
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            topology = Topology(namespace)
            queue = await channel.declare_queue(topology.job_queue("ltx-video"), passive=True)
            message = await queue.get(no_ack=False)
            assert decode(message.body).job_id == cancelled[0]
            await message.ack()
            events = await topology.declare_events(channel)
            notice = JobDropped(job_id=cancelled[0], model="ltx-video", priority="normal")
            await events.publish(to_amqp(notice), routing_key=Topology.dropped_key(cancelled[0]))
        await until(lambda: _equals(queue_depth(), 2), what="drop notice received")
        async with http.get(f"{gateway}/metrics") as response:
            assert 'videogen_queue_ended_messages{model="ltx-video"} 1.0' in await response.text()
    finally:
        devstack.stop_pid(gateway_proc.pid)  # else it declares its queues again once they are deleted
        await delete_test_namespace(amqp_url, namespace)


async def _equals(value: Any, expected: object) -> bool:
    return await value == expected


@pytest.mark.parametrize(
    ("frames", "width", "rule"), [(9, 64, "max_size"), (25, 32, "max_duration"), (15, 32, "max_frames")]
)
async def test_video_bounds_are_enforced(http, bounded_gateway, frames, width, rule) -> None:
    gateway = bounded_gateway
    form = aiohttp.FormData()
    for name, value in {"prompt": "p", "model": "ltx-tiny", "num_frames": 9}.items():
        form.add_field(name, str(value))
    form.add_field("video", mp4_bytes(frames, width, 32, fps=8), filename="in.mp4")
    async with http.post(f"{gateway}/api/v1/generate/video-to-video", data=form) as response:
        payload = await response.json()
    assert response.status == 422, payload
    assert payload["error"]["details"][0]["field"] == "video" and payload["error"]["details"][0]["rule"] == rule


@pytest.fixture(scope="module")
def bounded_gateway(stack) -> str:
    url, _ = stack.start_gateway(
        "gateway-bounded", VIDEOGEN_MAX_VIDEO_SIDE="48", VIDEOGEN_MAX_VIDEO_SECONDS="2", VIDEOGEN_MAX_VIDEO_FRAMES="12"
    )
    return url
