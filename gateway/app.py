"""The gateway application: `create_app(settings)` wires resources, routes and middleware."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp_cors
import structlog
from aiohttp import web

from common.settings import GatewaySettings
from common.store import ObjectStore
from common.topology import Topology
from gateway import handlers, jobs, models, ws
from gateway.broker import GatewayBroker
from gateway.deadletters import dead_letter_handler, expiry_handler
from gateway.errors import error_middleware, timeout_middleware
from gateway.events import EventHub
from gateway.keys import BROKER, HUB, REGISTRY, SETTINGS, STORE, WEBHOOKS
from gateway.webhooks import WebhookDeliverer

log = structlog.get_logger("gateway")


def create_app(settings: GatewaySettings) -> web.Application:
    # Body limits are enforced per route by the handlers (JSON vs uploads); this is the outer bound.
    app = web.Application(
        client_max_size=settings.max_upload_bytes * 4 // 3 + 65536,
        middlewares=[error_middleware, timeout_middleware(settings.request_timeout_s)],
    )
    app[SETTINGS] = settings
    app[REGISTRY] = settings.registry()
    app[HUB] = EventHub()
    app.cleanup_ctx.append(_store_ctx)
    app.cleanup_ctx.append(_broker_ctx)
    app.on_shutdown.append(_close_streams)
    add_routes(app)
    return app


def add_routes(app: web.Application) -> None:
    app.router.add_get("/health", handlers.health)
    app.router.add_get("/ready", handlers.ready)
    for mode in handlers.MODES:
        app.router.add_post(f"/api/v1/generate/{mode}", handlers.submit_handler(mode))
    app.router.add_get("/api/v1/models", models.list_models)
    app.router.add_get("/api/v1/model/info", models.model_info)
    app.router.add_post("/api/v1/models/download", handlers.download_model)
    app.router.add_get("/api/v1/jobs", jobs.list_jobs)
    app.router.add_get("/api/v1/jobs/{job_id}", jobs.get_job)
    app.router.add_get("/api/v1/job/{job_id}", jobs.get_job)  # the seed's path
    app.router.add_post("/api/v1/jobs/{job_id}/cancel", jobs.cancel_job)
    app.router.add_delete("/api/v1/jobs/{job_id}", jobs.cancel_job)
    app.router.add_get("/api/v1/ws", ws.job_events)
    app.router.add_get("/api/v1/events", ws.job_events_sse)
    _enable_cors(app, app[SETTINGS].cors_allow_origins)


def _enable_cors(app: web.Application, origins: list[str]) -> None:
    """Browsers on the listed origins ("*": any) may call every route; preflights are answered."""
    if not origins:
        return
    options = aiohttp_cors.ResourceOptions(
        allow_credentials=False,
        allow_methods=["GET", "POST", "DELETE"],
        allow_headers=("Content-Type", "Idempotency-Key", "Last-Event-ID", "Authorization"),
        expose_headers=("Location", "Retry-After", "Idempotent-Replayed"),
        max_age=3600,
    )
    cors = aiohttp_cors.setup(app, defaults={origin: options for origin in origins})
    for route in list(app.router.routes()):
        cors.add(route)


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
    app[BROKER] = broker
    await broker.start(
        sorted(app[REGISTRY].models),
        on_dead_letter=dead_letter_handler(app[STORE], broker, app[REGISTRY]),
        on_expiry=expiry_handler(app[STORE], broker),
    )
    deliverer = None
    if settings.webhook_secret is not None:
        deliverer = app[WEBHOOKS] = WebhookDeliverer(settings, app[STORE], Topology(settings.broker_namespace))
        await deliverer.start(broker.connection)
    log.info("gateway_started", host=settings.host, port=settings.port, webhooks=deliverer is not None)
    yield
    if deliverer is not None:
        await deliverer.close()
    await broker.close()


async def _close_streams(app: web.Application) -> None:
    app[HUB].close_all()
