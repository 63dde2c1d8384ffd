"""The gateway's middlewares on an in-process app: errors become JSON, slow requests a 504."""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from common.store import RecordChanged
from gateway.errors import error_middleware, timeout_middleware
from gateway.handlers import run_to_end
from gateway.keys import SUBMISSIONS


async def slow(request: web.Request) -> web.Response:
    await asyncio.Event().wait()  # never answers by itself
    return web.json_response({})


async def broken(request: web.Request) -> web.Response:
    raise RuntimeError("bug")


async def contended(request: web.Request) -> web.Response:
    raise RecordChanged("2b1f6c1e-57a4-4d7e-9d0c-4f61a9e0b2c3")  # as update_record does after its tries


async def stream(request: web.Request) -> web.Response:
    await asyncio.sleep(0.3)  # longer than the deadline, but streams have none
    return web.json_response({"ok": True})


async def test_slow_requests_get_504_json_and_streams_are_exempt() -> None:
    app = web.Application(middlewares=[error_middleware, timeout_middleware(0.1)])
    app.router.add_get("/slow", slow)
    app.router.add_get("/broken", broken)
    app.router.add_get("/contended", contended)
    app.router.add_get("/api/v1/events", stream)
    async with TestClient(TestServer(app)) as client:
        response = await client.get("/slow")
        assert response.status == 504 and (await response.json())["error"]["code"] == "timeout"
        response = await client.get("/broken")
        assert response.status == 500 and (await response.json())["error"]["code"] == "internal_error"
        response = await client.get("/contended")
        assert response.status == 503 and (await response.json())["error"]["code"] == "record_busy"
        assert response.headers["Retry-After"] == "1"
        response = await client.get("/api/v1/events")
        assert response.status == 200 and (await response.json()) == {"ok": True}


async def test_a_submission_cut_off_by_the_deadline_still_runs_to_its_end() -> None:
    """The client gets its 504, but the job it may already have stored is still queued (or marked failed)."""
    started, release, finished = asyncio.Event(), asyncio.Event(), []

    async def queue_the_job() -> str:
        started.set()
        await release.wait()
        finished.append("queued")
        return "queued"

    async def submit(request: web.Request) -> web.Response:
        return web.json_response({"status": await run_to_end(request, queue_the_job())})

    app = web.Application(middlewares=[error_middleware, timeout_middleware(0.1)])
    app[SUBMISSIONS] = set()
    app.router.add_post("/submit", submit)
    async with TestClient(TestServer(app)) as client:
        response = await client.post("/submit")
        assert response.status == 504 and started.is_set()
        assert len(app[SUBMISSIONS]) == 1 and finished == []  # cut off, not cancelled
        release.set()
        await asyncio.wait_for(asyncio.wait(app[SUBMISSIONS]), 5)
        assert finished == ["queued"] and app[SUBMISSIONS] == set()
