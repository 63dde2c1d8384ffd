"""The gateway's middlewares on an in-process app: errors become JSON, slow requests a 504."""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.errors import error_middleware, timeout_middleware


async def slow(request: web.Request) -> web.Response:
    await asyncio.Event().wait()  # never answers by itself
    return web.json_response({})


async def broken(request: web.Request) -> web.Response:
    raise RuntimeError("bug")


async def stream(request: web.Request) -> web.Response:
    await asyncio.sleep(0.3)  # longer than the deadline, but streams have none
    return web.json_response({"ok": True})


async def test_slow_requests_get_504_json_and_streams_are_exempt() -> None:
    app = web.Application(middlewares=[error_middleware, timeout_middleware(0.1)])
    app.router.add_get("/slow", slow)
    app.router.add_get("/broken", broken)
    app.router.add_get("/api/v1/events", stream)
    async with TestClient(TestServer(app)) as client:
        response = await client.get("/slow")
        assert response.status == 504 and (await response.json())["error"]["code"] == "timeout"
        response = await client.get("/broken")
        assert response.status == 500 and (await response.json())["error"]["code"] == "internal_error"
        response = await client.get("/api/v1/events")
        assert response.status == 200 and (await response.json()) == {"ok": True}
