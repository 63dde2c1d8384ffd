"""Helpers for the tests: clients for the end-to-end tests (submit, watch over WebSocket,
download), and a fake of the store's job records for unit tests."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import aiohttp

from common.store import RecordChanged
from schemas.jobs import GenerationParams, JobRecord, JobStatus, Phase, utcnow

# The API keys of the test stack (tests/conftest.py writes their hashes into the gateway's key file).
TOKENS = {
    "tester": "vg_test-tester-0123456789",
    "other": "vg_test-other-0123456789",
    "limited": "vg_test-limited-0123456789",
    "limited-openai": "vg_test-limited-openai-0123456789",  # its own window: tests of one key's limit don't meet
    "quota2": "vg_test-quota2-0123456789",
}


def client(token: str | None = TOKENS["tester"], **kwargs: Any) -> aiohttp.ClientSession:
    """A session that sends an API key to the gateway (the tests' gateways all require one)."""
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    return aiohttp.ClientSession(headers=headers, **kwargs)


async def submit(
    http: aiohttp.ClientSession,
    gateway: str,
    body: dict[str, Any],
    mode: str = "text-to-video",
    files: dict[str, bytes] | None = None,
) -> dict[str, Any]:
    """Submit as JSON, or as multipart when `files` are given; expect 202."""
    url = f"{gateway}/api/v1/generate/{mode}"
    if files:
        form = aiohttp.FormData()
        for name, value in body.items():
            form.add_field(name, str(value))
        for name, data in files.items():
            form.add_field(name, data, filename=f"upload.{name}", content_type="application/octet-stream")
        request = http.post(url, data=form)
    else:
        request = http.post(url, json=body)
    async with request as response:
        payload = await response.json()
        assert response.status == 202, payload
        return payload


async def watch(
    http: aiohttp.ClientSession, gateway: str, job_id: str | list[str], timeout: float = 60.0, **params: Any
) -> list[dict[str, Any]]:
    """Every frame of the jobs' WebSocket until the server closes it (after the terminal frames)."""
    frames: list[dict[str, Any]] = []
    query = [("job_id", j) for j in ([job_id] if isinstance(job_id, str) else job_id)] + list(params.items())

    async def collect() -> None:
        async with http.ws_connect(f"{gateway}/api/v1/ws", params=query) as ws:
            async for msg in ws:
                assert msg.type == aiohttp.WSMsgType.TEXT, msg
                frames.append(msg.json())

    await asyncio.wait_for(collect(), timeout)
    return frames


async def sse_events(response: aiohttp.ClientResponse) -> Any:
    """Parse a text/event-stream: yields (id, event, data) per event; skips pings."""
    fields: dict[str, str] = {}
    async for raw in response.content:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if "data" in fields:
                yield fields.get("id"), fields.get("event"), fields["data"]
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value


async def fetch_link(url: str) -> tuple[int, bytes]:
    """GET a presigned link as any client would: with no API key (the link carries its own signature)."""
    async with aiohttp.ClientSession() as plain, plain.get(url) as response:
        return response.status, await response.read()


async def download(url: str, path: Path) -> Path:
    status, body = await fetch_link(url)
    assert status == 200, body[:500]
    path.write_bytes(body)
    return path


async def get_json(http: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
    async with http.get(url) as response:
        return response.status, await response.json()


def png_bytes(width: int, height: int, fmt: str = "PNG", seed: int = 0) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def mp4_bytes(frames: int, width: int, height: int, fps: int = 8) -> bytes:
    import tempfile

    import numpy as np

    from worker.encode import encode_mp4

    video = np.random.default_rng(1).integers(0, 255, (frames, height, width, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "in.mp4"
        encode_mp4(video, fps, path)
        return path.read_bytes()


async def until(check: Any, timeout: float = 30.0, what: str = "condition") -> None:
    """Poll the async predicate `check` (backing off to 0.5 s) until it holds, or fail after `timeout`."""
    deadline = asyncio.get_running_loop().time() + timeout
    delay = 0.05
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, f"{what}: not within {timeout:.0f}s"
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.5)


async def until_step(
    http: aiohttp.ClientSession, gateway: str, job_id: str, step: int, timeout: float = 60.0
) -> list[dict[str, Any]]:
    """The job's frames over WebSocket up to the first one reporting denoising `step`."""
    frames: list[dict[str, Any]] = []

    async def read() -> None:
        async with http.ws_connect(f"{gateway}/api/v1/ws", params={"job_id": job_id}) as ws:
            async for msg in ws:
                frames.append(msg.json())
                if frames[-1].get("step") == step:
                    return

    await asyncio.wait_for(read(), timeout)
    return frames


def s3_client(where: Any) -> Any:
    """A minio client for the test store: `where` is the S3Store fixture or the Stack (its env)."""
    from minio import Minio

    if hasattr(where, "endpoint"):
        endpoint, access, secret = where.endpoint, where.access_key, where.secret_key
    else:
        env = where.env
        endpoint, access = env["VIDEOGEN_S3_ENDPOINT"], env["VIDEOGEN_S3_ACCESS_KEY"]
        secret = env["VIDEOGEN_S3_SECRET_KEY"]
    return Minio(endpoint, access_key=access, secret_key=secret, secure=False, region="us-east-1")


def bucket_of(where: Any) -> str:
    return where.bucket if hasattr(where, "bucket") else where.env["VIDEOGEN_S3_BUCKET"]


def object_names(where: Any, prefix: str) -> set[str]:
    """Every object under `prefix` in the test store."""
    return {o.object_name for o in s3_client(where).list_objects(bucket_of(where), prefix=prefix, recursive=True)}


def tiny_params(**changes: Any) -> GenerationParams:
    """Resolved parameters of a small ltx-tiny job, for tests that need a job message or record."""
    fields: dict[str, Any] = {
        "prompt": "p",
        "model": "ltx-tiny",
        "num_frames": 9,
        "width": 32,
        "height": 32,
        "fps": 8,
        "num_inference_steps": 2,
        "guidance_scale": 1.0,
        "seed": 1,
    }
    return GenerationParams(**fields | changes)


def queued_record(job_id: str = "j", **changes: Any) -> JobRecord:
    """A tiny text-to-video job's record as the gateway first writes it (`changes` on top)."""
    now = utcnow()
    fields: dict[str, Any] = {
        "job_id": job_id,
        "mode": "text-to-video",
        "model": "ltx-tiny",
        "status": JobStatus.QUEUED,
        "phase": Phase.QUEUED,
        "progress": 0.0,
        "seq": 0,
        "created_at": now,
        "updated_at": now,
        "params": tiny_params(),
    }
    return JobRecord(**(fields | changes))


class FakeRecords:
    """Job records as an S3 bucket keeps them, for unit tests: a record's ETag is the MD5 of its
    bytes, and a conditional write over a version no longer stored fails (S3's 412)."""

    def __init__(self) -> None:
        self.records: dict[str, JobRecord] = {}

    @staticmethod
    def etag(record: JobRecord) -> str:
        return hashlib.md5(record.model_dump_json().encode()).hexdigest()

    async def get_record(self, job_id: str) -> JobRecord | None:
        await asyncio.sleep(0)  # yield like real I/O would
        return self.records.get(job_id)

    async def get_record_tagged(self, job_id: str) -> tuple[JobRecord, str] | None:
        record = await self.get_record(job_id)
        return None if record is None else (record, self.etag(record))

    async def put_record(self, record: JobRecord) -> None:
        await asyncio.sleep(0)
        self.records[record.job_id] = record

    async def replace_record(self, record: JobRecord, etag: str | None) -> str:
        await asyncio.sleep(0)
        stored = self.records.get(record.job_id)
        if (None if stored is None else self.etag(stored)) != etag:
            raise RecordChanged(record.job_id)
        self.records[record.job_id] = record
        return self.etag(record)
