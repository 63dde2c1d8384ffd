"""Prometheus metrics of the gateway, at `GET /metrics` (no API key: scrapers reach it inside the cluster).

Requests by route and status, their latency, submissions, and, read from the broker at each
scrape, the queue depth per model and priority and the workers serving each model.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

from gateway.keys import BROKER, HUB, REGISTRY
from schemas.jobs import PRIORITIES

REQUESTS = Counter("videogen_http_requests_total", "HTTP requests answered", ["method", "route", "status"])
LATENCY = Histogram(
    "videogen_http_request_seconds",
    "Time to answer an HTTP request (streams: until the stream closes)",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
SUBMITTED = Counter("videogen_jobs_submitted_total", "Jobs accepted (202)", ["model", "mode", "priority"])
QUEUE_DEPTH = Gauge("videogen_queue_depth", "Jobs waiting for a worker", ["model", "priority"])
ENDED_IN_QUEUE = Gauge(
    "videogen_queue_ended_messages",
    "Messages of jobs that ended while queued (cancelled, expired), still in a model's queues until a worker drops them",
    ["model"],
)
WORKERS = Gauge("videogen_workers", "Workers serving a model", ["model"])
STREAMS = Gauge("videogen_event_streams", "WebSocket and SSE clients connected to this gateway")
BROKER_UP = Gauge("videogen_broker_connected", "1 while the gateway's broker connection is up")


async def route_of(request: web.Request) -> str:
    """The route's pattern (`/api/v1/jobs/{job_id}`), never the raw path: labels stay few. A
    method the path does not take (405) counts under the path's pattern too; only a path that no
    route matches is "unmatched"."""
    info = request.match_info
    resource = info.route.resource if info is not None and info.route is not None else None
    if resource is not None:
        return resource.canonical
    if isinstance(getattr(info, "http_exception", None), web.HTTPMethodNotAllowed):
        for candidate in request.app.router.resources():
            found, methods = await candidate.resolve(request)
            if found is None and methods:  # the path matched, the method did not
                return candidate.canonical
    return "unmatched"


@web.middleware
async def metrics_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        route = await route_of(request)
        REQUESTS.labels(request.method, route, str(status)).inc()
        LATENCY.labels(request.method, route).observe(time.perf_counter() - started)


async def metrics(request: web.Request) -> web.Response:
    app = request.app
    broker = app[BROKER]
    BROKER_UP.set(1 if broker.connected else 0)
    STREAMS.set(app[HUB].subscriber_count)
    if broker.connected:
        for model_id in app[REGISTRY].models:
            try:
                stats = await broker.model_stats(model_id)
            except Exception:
                continue  # the broker went away mid-scrape: keep the last values
            for priority in PRIORITIES:
                QUEUE_DEPTH.labels(model_id, priority).set(stats.waiting.get(priority, 0))
            WORKERS.labels(model_id).set(stats.consumers)
            ENDED_IN_QUEUE.labels(model_id).set(stats.ended)
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})
