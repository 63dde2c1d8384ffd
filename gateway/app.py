"""The gateway application: `create_app(settings)` wires resources, routes and middleware."""

from __future__ import annotations

from collections.abc import AsyncIterator

import structlog
from aiohttp import web

from common.settings import GatewaySettings
from common.store import ObjectStore
from common.topology import Topology
from gateway import handlers, ws
from gateway.broker import GatewayBroker
from gateway.errors import error_middleware
from gateway.events import EventHub
from gateway.keys import BROKER, HUB, REGISTRY, SETTINGS, STORE

log = structlog.get_logger("gateway")


def create_app(settings: GatewaySettings) -> web.Application:
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[error_middleware])
    app[SETTINGS] = settings
    app[REGISTRY] = settings.registry()
    app[HUB] = EventHub(settings.event_buffer_jobs)
    app.cleanup_ctx.append(_store_ctx)
    app.cleanup_ctx.append(_broker_ctx)
    app.on_shutdown.append(_close_streams)
    add_routes(app)
    return app


def add_routes(app: web.Application) -> None:
    app.router.add_get("/health", handlers.health)
    app.router.add_get("/ready", handlers.ready)
    app.router.add_post("/api/v1/generate/text-to-video", handlers.submit_text_to_video)
    app.router.add_get("/api/v1/jobs/{job_id}", handlers.get_job)
    app.router.add_get("/api/v1/job/{job_id}", handlers.get_job)  # the seed's path
    app.router.add_get("/api/v1/ws", ws.job_events)


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    store = ObjectStore(settings, public_endpoint=settings.s3_public_endpoint)
    try:
        await store.ensure_bucket()
    except Exception as exc:  # /ready reports it; the gateway still starts and recovers when the store does
        log.warning("store_unreachable_at_start", error=str(exc))
    app[STORE] = store
    yield


async def _broker_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    broker = GatewayBroker(settings.amqp_url, Topology(settings.broker_namespace), app[HUB])
    await broker.start(sorted(app[REGISTRY].models))
    app[BROKER] = broker
    log.info("gateway_started", host=settings.host, port=settings.port)
    yield
    await broker.close()


async def _close_streams(app: web.Application) -> None:
    app[HUB].close_all()
