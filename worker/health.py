"""A small HTTP server beside the worker: `/health` (alive), `/ready` (models loaded, taking jobs)
and `/metrics` (Prometheus)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web

from worker.metrics import render
from worker.worker import Worker

WORKER = web.AppKey("worker", Worker)


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _ready(request: web.Request) -> web.Response:
    worker = request.app[WORKER]
    body = {
        "status": "ready" if worker.ready else "unavailable",
        "worker": worker.worker_id,
        "models": sorted(worker.models),
        "jobs_done": worker.jobs_done,
    }
    return web.json_response(body, status=200 if worker.ready else 503)


async def _metrics(request: web.Request) -> web.Response:
    return render(request.app[WORKER].devices)


@asynccontextmanager
async def serve_health(worker: Worker, host: str, port: int) -> AsyncIterator[None]:
    if port == 0:
        yield
        return
    app = web.Application()
    app[WORKER] = worker
    app.router.add_get("/health", _health)
    app.router.add_get("/ready", _ready)
    app.router.add_get("/metrics", _metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    try:
        yield
    finally:
        await runner.cleanup()
