"""Client-side helpers for the end-to-end tests: submit, watch over WebSocket, download."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp


async def submit(http: aiohttp.ClientSession, gateway: str, body: dict[str, Any]) -> dict[str, Any]:
    async with http.post(f"{gateway}/api/v1/generate/text-to-video", json=body) as response:
        payload = await response.json()
        assert response.status == 202, payload
        return payload


async def watch(http: aiohttp.ClientSession, gateway: str, job_id: str, timeout: float = 60.0) -> list[dict[str, Any]]:
    """Every frame of the job's WebSocket until the server closes it (after the terminal frame)."""
    frames: list[dict[str, Any]] = []

    async def collect() -> None:
        async with http.ws_connect(f"{gateway}/api/v1/ws", params={"job_id": job_id}) as ws:
            async for msg in ws:
                assert msg.type == aiohttp.WSMsgType.TEXT, msg
                frames.append(msg.json())

    await asyncio.wait_for(collect(), timeout)
    return frames


async def download(http: aiohttp.ClientSession, url: str, path: Path) -> Path:
    async with http.get(url) as response:
        assert response.status == 200, await response.text()
        path.write_bytes(await response.read())
    return path


async def get_json(http: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
    async with http.get(url) as response:
        return response.status, await response.json()
