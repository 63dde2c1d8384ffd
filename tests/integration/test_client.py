"""The Python client (`videogen_client`) and the `videogen` command against the real stack."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import uuid
from contextlib import aclosing
from pathlib import Path

import pytest

from scripts.devstack import free_port_block, start_gateway, stop_pid
from tests.helpers import TOKENS, mp4_bytes, png_bytes
from videogen_client import (
    AsyncClient,
    AuthenticationError,
    Client,
    ConflictError,
    GatewayUnreachableError,
    JobNotSucceededError,
    NotFoundError,
    ValidationError,
    VideogenError,
    WaitTimeoutError,
)
from worker.encode import probe_mp4

ROOT = Path(__file__).resolve().parents[2]
SMALL = {"width": 32, "height": 32, "num_frames": 9, "steps": 2}  # ltx-tiny: a job of well under a second
SMALL_FLAGS = ["--width", "32", "--height", "32", "--frames", "9", "--steps", "2"]
WAIT_S = 60.0  # deadline for one small job from submission to its end


@pytest.fixture
def client(stack) -> Client:
    with Client(stack.gateway_url, TOKENS["tester"]) as c:
        yield c


@pytest.fixture
async def aclient(stack) -> AsyncClient:
    async with AsyncClient(stack.gateway_url, TOKENS["tester"]) as c:
        yield c


def assert_small_mp4(path: Path, frames: int = 9, width: int = 32, height: int = 32) -> None:
    info = probe_mp4(path)
    assert (info.num_frames, info.width, info.height, info.codec) == (frames, width, height, "h264"), info


def run_cli(stack, *args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    """`videogen ARGS` as a separate process, configured the way a user would: VIDEOGEN_URL and VIDEOGEN_API_KEY."""
    environment = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "VIDEOGEN_URL": stack.gateway_url,
        "VIDEOGEN_API_KEY": TOKENS["tester"],
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "videogen_client.cli", *args],
        cwd=cwd or ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


# -- the library ----------------------------------------------------------------------------------


def test_sync_generate_wait_download(client: Client, tmp_path: Path) -> None:
    accepted = client.generate("a lighthouse in a storm", model="ltx-tiny", seed=7, fps=12, **SMALL)
    assert accepted["status"] == "queued" and accepted["mode"] == "text-to-video"
    assert accepted["request"]["num_inference_steps"] == 2 and accepted["request"]["seed"] == 7

    job = client.wait(accepted, timeout=WAIT_S)
    assert job["status"] == "succeeded", job
    assert job["job_id"] == accepted["job_id"] and job["result"]["url"]

    # The presigned link is fetched without the API key: the store refuses a request carrying both.
    path = client.download(job, tmp_path / "sync.mp4")
    assert path == tmp_path / "sync.mp4" and not list(tmp_path.glob("*.part"))
    assert_small_mp4(path)
    assert probe_mp4(path).fps == 12
    assert client.get_job(job["job_id"])["status"] == "succeeded"

    # By id, into a directory: the job is read first, and the file is named after it.
    assert client.download(job["job_id"], tmp_path) == tmp_path / f"{job['job_id']}.mp4"
    assert_small_mp4(tmp_path / f"{job['job_id']}.mp4")


async def test_async_client_from_env_generate_wait_download(
    stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VIDEOGEN_URL", stack.gateway_url)
    monkeypatch.setenv("VIDEOGEN_API_KEY", TOKENS["tester"])
    async with AsyncClient() as client:
        assert client.url == stack.gateway_url
        accepted = await client.generate("waves on a beach", **SMALL)
        seen: list[dict] = []
        job = await client.wait(accepted["job_id"], timeout=WAIT_S, on_event=seen.append)
        assert job["status"] == "succeeded", job
        assert seen[0]["phase"] == "queued" and seen[-1]["status"] == "succeeded"
        path = await client.download(job, tmp_path / "async.mp4")
    assert_small_mp4(path)


async def test_image_and_video_uploads(aclient: AsyncClient, tmp_path: Path) -> None:
    image = tmp_path / "photo.png"
    image.write_bytes(png_bytes(48, 40))
    accepted = await aclient.generate("a lighthouse at dusk", image=image, seed=3, **SMALL)
    assert accepted["mode"] == "image-to-video"
    job = await aclient.wait(accepted, timeout=WAIT_S)
    assert job["status"] == "succeeded", job
    assert_small_mp4(await aclient.download(job, tmp_path / "i2v.mp4"))

    # Video-to-video from bytes, with strength: int(2 steps x 1.0) = 2 denoising steps.
    accepted = await aclient.generate("the same, as a watercolour", video=mp4_bytes(9, 32, 32), strength=1.0, **SMALL)
    assert accepted["mode"] == "video-to-video" and accepted["request"]["strength"] == 1.0
    job = await aclient.wait(accepted, timeout=WAIT_S)
    assert job["status"] == "succeeded" and job["total_steps"] == 2, job
    assert_small_mp4(await aclient.download(job, tmp_path / "v2v.mp4"))

    with pytest.raises(ValueError):
        await aclient.generate("both", image=image, video=b"x")


async def test_events_arrive_in_order_and_resume(aclient: AsyncClient, client: Client) -> None:
    accepted = await aclient.generate("a red fox in snow", **SMALL)
    events = [event async for event in aclient.events(accepted)]

    assert [e["seq"] for e in events] == list(range(len(events))), "every event, in order, from the first"
    assert all(e["job_id"] == accepted["job_id"] for e in events)
    assert events[0]["phase"] == "queued" and events[-1]["status"] == "succeeded"
    assert [e["step"] for e in events if e["phase"] == "denoising"] == [1, 2]
    assert "job" in events[-1] and all("job" not in e for e in events[:-1])
    progress = [e["progress"] for e in events]
    assert progress == sorted(progress) and progress[-1] == 1.0

    # Resumed after a seq: only the later events; after the terminal one: nothing, and the stream ends.
    resumed = [event async for event in aclient.events(accepted["job_id"], since=2)]
    assert [e["seq"] for e in resumed] == [e["seq"] for e in events[3:]]
    assert [event async for event in aclient.events(accepted["job_id"], since=events[-1]["seq"])] == []

    # The blocking client yields the same stream.
    assert [e["seq"] for e in client.events(accepted["job_id"])] == [e["seq"] for e in events]


async def test_events_resume_across_a_gateway_restart(stack) -> None:
    port = free_port_block(1)
    url = f"http://127.0.0.1:{port}"
    gateway = start_gateway(stack.env, port, stack.logs / "gateway-client-restart.log")
    stack.procs.append(gateway)
    events = []
    async with AsyncClient(url, TOKENS["tester"], max_reconnects=10) as client:
        accepted = await client.generate("through a restart", model="ltx-slow", steps=40)
        async with asyncio.timeout(120), aclosing(client.events(accepted)) as stream:
            async for event in stream:
                events.append(event)
                if event.get("step") == 2 and gateway.poll() is None:
                    # The gateway goes away mid-job and another takes its address: the stream resumes there.
                    await asyncio.to_thread(stop_pid, gateway.pid)
                    replacement = await asyncio.to_thread(
                        start_gateway, stack.env, port, stack.logs / "gateway-client-replacement.log"
                    )
                    stack.procs.append(replacement)
    assert gateway.poll() is not None
    assert [e["seq"] for e in events] == list(range(len(events))), "no gap and no repeat across the restart"
    assert events[-1]["status"] == "succeeded"
    assert sum(e["phase"] == "denoising" for e in events) == 40


def test_list_jobs_and_models(client: Client) -> None:
    ids = [client.generate(f"listed {i}", **SMALL)["job_id"] for i in range(2)]
    for job_id in ids:
        assert client.wait(job_id, timeout=WAIT_S)["status"] == "succeeded"

    page = client.list_jobs(model="ltx-tiny", limit=2)
    assert [job["job_id"] for job in page["jobs"]] == ids[::-1], "newest first"
    assert page["next_cursor"]
    older = client.list_jobs(model="ltx-tiny", limit=2, cursor=page["next_cursor"])
    assert not set(ids) & {job["job_id"] for job in older["jobs"]}

    succeeded = client.list_jobs(status="succeeded", limit=100)["jobs"]
    assert set(ids) <= {job["job_id"] for job in succeeded}
    assert all(job["status"] == "succeeded" for job in succeeded)

    listing = client.models()
    assert listing["default_model"] == "ltx-tiny"
    models = {model["id"]: model for model in listing["models"]}
    assert models["ltx-tiny"]["workers"] >= 1 and "image-to-video" in models["ltx-tiny"]["modes"]
    assert client.model_info("wan-tiny")["id"] == "wan-tiny"


async def test_cancel_running_job(aclient: AsyncClient) -> None:
    accepted = await aclient.generate("a long one", model="ltx-slow", steps=200)
    with pytest.raises(WaitTimeoutError) as timed_out:
        await aclient.wait(accepted, timeout=0.5)
    assert timed_out.value.job_id == accepted["job_id"] and timed_out.value.code == "wait_timeout"

    async with asyncio.timeout(WAIT_S), aclosing(aclient.events(accepted)) as events:
        async for event in events:  # up to its first denoising step
            if event["phase"] == "denoising":
                break
    stopping = await aclient.cancel(accepted)
    assert stopping["status"] == "running", stopping  # 202: the worker stops it after the current step

    final = await aclient.wait(accepted, timeout=WAIT_S)
    assert final["status"] == "cancelled" and final["message"] == "cancelled while running", final
    with pytest.raises(ConflictError) as again:
        await aclient.cancel(accepted)
    assert (again.value.status, again.value.code) == (409, "job_finished")
    with pytest.raises(JobNotSucceededError) as no_video:
        await aclient.download(final)
    assert no_video.value.job["status"] == "cancelled" and "cancelled" in str(no_video.value)


def test_validation_error_carries_code_and_details(client: Client) -> None:
    with pytest.raises(ValidationError) as refused:
        client.generate("x", model="ltx-tiny", width=33, num_frames=10)
    error = refused.value
    assert isinstance(error, VideogenError)
    assert (error.status, error.code) == (422, "validation_error")
    assert {(d["field"], d["rule"]) for d in error.details} == {("width", "multiple_of_32"), ("num_frames", "8k+1")}
    assert "multiple of 32" in error.message
    assert "width (multiple_of_32)" in error.describe()

    with pytest.raises(ValidationError) as bad_file:
        client.generate("x", image=b"not an image at all")
    assert bad_file.value.code == "invalid_input"
    assert [(d["field"], d["rule"]) for d in bad_file.value.details] == [("image", "decodable")]


async def test_unknown_job_is_not_found(aclient: AsyncClient) -> None:
    unknown = str(uuid.uuid4())
    with pytest.raises(NotFoundError) as by_get:
        await aclient.get_job(unknown)
    assert (by_get.value.status, by_get.value.code) == (404, "job_not_found")
    with pytest.raises(NotFoundError) as by_stream:  # the refused WebSocket handshake, with the gateway's code
        [event async for event in aclient.events(unknown)]
    assert by_stream.value.code == "job_not_found"


def test_wrong_or_missing_api_key_is_401(stack) -> None:
    for key in ("vg_not-a-key", ""):
        with Client(stack.gateway_url, key) as client, pytest.raises(AuthenticationError) as refused:
            client.models()
        assert (refused.value.status, refused.value.code) == (401, "unauthorized")


async def test_unreachable_gateway_is_explained() -> None:
    url = f"http://127.0.0.1:{free_port_block(1)}"  # nothing listens there
    with Client(url, "vg_any") as client, pytest.raises(GatewayUnreachableError) as refused:
        client.models()
    message = str(refused.value)
    assert refused.value.status is None and refused.value.code == "unreachable"
    assert f"gateway at {url} is not reachable (connection refused)" in message
    assert "scripts/stack up" in message and "VIDEOGEN_URL" in message

    async with AsyncClient(url, "vg_any") as client:  # the stream too, at once rather than after retries
        with pytest.raises(GatewayUnreachableError):
            await client.wait(str(uuid.uuid4()), timeout=WAIT_S)


# -- the videogen command -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["text", "image"])
def test_cli_generate_wait_saves_a_playable_file(stack, tmp_path: Path, mode: str) -> None:
    out = tmp_path / f"{mode}.mp4"
    extra = []
    if mode == "image":
        (tmp_path / "photo.png").write_bytes(png_bytes(40, 40))
        extra = ["--image", str(tmp_path / "photo.png")]
    done = run_cli(stack, "generate", "a fox in the snow", *SMALL_FLAGS, *extra, "--wait", "--out", str(out))

    assert done.returncode == 0, done.stderr
    assert_small_mp4(out)
    job_id = re.search(r"job ([0-9a-f-]{36}) queued", done.stdout).group(1)
    assert f"saved {out} (" in done.stdout
    assert "9 frames, 32x32" in done.stdout
    # The progress bar, fed by the WebSocket: phases, steps and the end.
    for shown in ("queued", "denoising", "step 1/2", "step 2/2", "succeeded", "100%"):
        assert shown in done.stderr, (shown, done.stderr)
    with Client(stack.gateway_url, TOKENS["tester"]) as client:
        assert client.get_job(job_id)["mode"] == f"{mode}-to-video"


def test_cli_generate_default_out_and_no_wait(stack, tmp_path: Path) -> None:
    done = run_cli(stack, "generate", "a quiet lake", *SMALL_FLAGS, "--wait", "--no-progress", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    [saved] = tmp_path.glob("*.mp4")
    assert re.fullmatch(r"[0-9a-f-]{36}\.mp4", saved.name) and f"saved {saved.name} " in done.stdout
    assert_small_mp4(saved)

    queued = run_cli(stack, "generate", "a quiet lake, again", *SMALL_FLAGS)
    assert queued.returncode == 0, queued.stderr
    job_id = re.match(r"job ([0-9a-f-]{36}) queued: model ltx-tiny", queued.stdout).group(1)
    with Client(stack.gateway_url, TOKENS["tester"]) as client:
        assert client.wait(job_id, timeout=WAIT_S)["status"] == "succeeded"

    shown = run_cli(stack, "job", job_id)
    assert shown.returncode == 0, shown.stderr
    job = json.loads(shown.stdout)
    assert job["job_id"] == job_id and job["status"] == "succeeded"


def test_cli_models_and_jobs_tables(stack) -> None:
    with Client(stack.gateway_url, TOKENS["tester"]) as client:
        job = client.wait(client.generate("for the table", **SMALL), timeout=WAIT_S)

    models = run_cli(stack, "models")
    assert models.returncode == 0, models.stderr
    header, *rows = models.stdout.splitlines()
    assert header.split() == ["MODEL", "FAMILY", "MODES", "DEFAULTS", "WORKERS", "QUEUED"]
    tiny = next(row for row in rows if row.startswith("ltx-tiny *"))
    assert "t2v,i2v,v2v" in tiny and "32x32, 9 frames, 8 fps, 2 steps" in tiny

    jobs = run_cli(stack, "jobs", "--model", "ltx-tiny", "--limit", "1")
    assert jobs.returncode == 0, jobs.stderr
    lines = jobs.stdout.splitlines()
    assert lines[0].split()[:4] == ["JOB", "ID", "STATUS", "PHASE"]
    assert lines[1].split()[:4] == [job["job_id"], "succeeded", "succeeded", "100%"]
    assert "more: videogen jobs --cursor " in jobs.stdout

    by_status = run_cli(stack, "--url", stack.gateway_url, "jobs", "--status", "failed", "--model", "ltx-tiny")
    assert by_status.returncode == 0, by_status.stderr
    assert job["job_id"] not in by_status.stdout


def test_cli_cancel(stack) -> None:
    with Client(stack.gateway_url, TOKENS["tester"]) as client:
        job_id = client.generate("to be cancelled", model="ltx-slow", steps=200)["job_id"]
        cancelled = run_cli(stack, "cancel", job_id)
        assert cancelled.returncode == 0, cancelled.stderr
        assert re.match(rf"job {job_id} (cancelled|is stopping)", cancelled.stdout), cancelled.stdout
        assert client.wait(job_id, timeout=WAIT_S)["status"] == "cancelled"

    again = run_cli(stack, "cancel", job_id)
    assert again.returncode == 1
    assert "error: 409 job_finished: " in again.stderr and "already ended" in again.stderr


def test_cli_errors(stack, tmp_path: Path) -> None:
    invalid = run_cli(stack, "generate", "x", "--width", "33", "--frames", "10")
    assert invalid.returncode == 1 and invalid.stdout == ""
    assert "error: 422 validation_error: " in invalid.stderr
    assert "  - width (multiple_of_32): width must be a multiple of 32" in invalid.stderr
    assert "  - num_frames (8k+1): " in invalid.stderr

    not_found = run_cli(stack, "job", str(uuid.uuid4()))
    assert not_found.returncode == 1 and "error: 404 job_not_found: " in not_found.stderr

    wrong_key = run_cli(stack, "models", "--api-key", "vg_not-a-key")
    assert wrong_key.returncode == 1
    assert "error: 401 unauthorized: " in wrong_key.stderr and "VIDEOGEN_API_KEY" in wrong_key.stderr

    url = f"http://127.0.0.1:{free_port_block(1)}"
    unreachable = run_cli(stack, "jobs", VIDEOGEN_URL=url)
    assert unreachable.returncode == 1
    assert f"gateway at {url} is not reachable (connection refused)" in unreachable.stderr
    assert "scripts/stack up" in unreachable.stderr

    picture = tmp_path / "p.png"
    picture.write_bytes(png_bytes(32, 32))
    for usage in (
        ["generate", "x", "--image", str(picture), "--video", str(picture)],
        ["generate", "x", "--image", str(tmp_path / "missing.png")],
        ["generate", "x", "--strength", "0.5"],
        ["generate", "x", "--width", "wide"],
        ["frobnicate"],
        [],
    ):
        wrong = run_cli(stack, *usage)
        assert wrong.returncode == 2, (usage, wrong.stderr)
        assert "usage: videogen" in wrong.stderr
