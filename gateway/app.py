"""The gateway application: `create_app(settings)` wires resources, routes and middleware."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp_cors
import structlog
from aiohttp import web

from common.settings import GatewaySettings
from common.store import ForeignLifecycleRules, ObjectStore
from common.topology import Topology
from gateway import handlers, jobs, metrics, models, openai_api, quota, ws
from gateway.auth import Keys, auth_middleware, load_keys
from gateway.broker import GatewayBroker
from gateway.deadletters import dead_letter_handler, expiry_handler
from gateway.errors import error_middleware, query_values, timeout_middleware
from gateway.events import EventHub
from gateway.keys import (
    BROKER,
    HUB,
    KEYS,
    REGISTRY,
    SETTINGS,
    STORE,
    STREAMS,
    SUBMISSIONS,
    UPLOAD_SLOTS,
    UPLOAD_SLOTS_BY_KEY,
    WEBHOOKS,
)
from gateway.metrics import metrics_middleware
from gateway.openapi import OPENAPI, build_openapi, openapi_document
from gateway.webhooks import WebhookDeliverer
from schemas.jobs import JobRecord
from schemas.messages import JobEvent

log = structlog.get_logger("gateway")


# What the retention rule expires: jobs (record, inputs, video) and the index entries listing them.
RETAINED_PREFIXES = ["jobs/", "index/"]
SUBMISSION_GRACE_S = 10.0  # how long a stopping gateway waits for submissions still being queued


def create_app(settings: GatewaySettings) -> web.Application:
    keys = build_keys(settings)
    # Body limits are enforced per route by the handlers (JSON vs uploads); this is the outer bound.
    app = web.Application(
        client_max_size=handlers.json_upload_limit(settings),
        middlewares=[
            metrics_middleware,
            error_middleware,
            auth_middleware(keys),
            query_values,
            timeout_middleware(settings.request_timeout_s),
        ],
    )
    app[SETTINGS] = settings
    app[KEYS] = keys
    app[quota.COUNTS] = {}
    app[REGISTRY] = settings.registry()
    app[HUB] = EventHub()
    app[SUBMISSIONS] = set()
    app[UPLOAD_SLOTS] = asyncio.Semaphore(settings.max_concurrent_uploads)
    app[UPLOAD_SLOTS_BY_KEY] = {}
    app[STREAMS] = {}
    app.cleanup_ctx.append(_store_ctx)
    app.cleanup_ctx.append(_broker_ctx)
    app.on_shutdown.append(_close_streams)
    add_routes(app)
    return app


# The web page: plain files, no build step.
STATIC = Path(__file__).resolve().parent / "static"


STATIC_FILES = frozenset(p.name for p in STATIC.iterdir() if p.is_file())


async def _index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html")


async def _static(request: web.Request) -> web.FileResponse:
    """The page's own files, by name only; anything else is a JSON 404 like every other error."""
    name = request.match_info["name"]
    if name not in STATIC_FILES:
        raise web.HTTPNotFound()
    return web.FileResponse(STATIC / name)


def build_keys(settings: GatewaySettings) -> Keys | None:
    """The API keys, or None when auth is disabled; a ConfigError when neither is configured."""
    if settings.auth_disabled:
        log.warning("auth_disabled", detail="every caller may use every job: for local development only")
        return None
    if settings.api_keys_file is None:
        raise ConfigError(
            "no API keys: set VIDEOGEN_API_KEYS_FILE (make keys with `python -m gateway.auth new "
            "<id>`), or VIDEOGEN_AUTH_DISABLED=true for local development"
        )
    try:
        api_keys = load_keys(settings.api_keys_file)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if not api_keys:
        raise ConfigError(f"API key file {settings.api_keys_file} has no keys")
    return Keys(api_keys, settings.rate_limit, settings.max_concurrent_jobs)


class ConfigError(Exception):
    """The gateway cannot start with these settings; the message says what to change."""


def add_routes(app: web.Application) -> None:
    app[OPENAPI] = build_openapi()
    later = handlers.expect_continue_later  # routes with a body: "100 Continue" once it is read
    app.router.add_get("/openapi.json", openapi_document)
    app.router.add_get("/metrics", metrics.metrics)
    app.router.add_get("/", _index)
    app.router.add_get("/static/{name}", _static)
    app.router.add_get("/health", handlers.health)
    app.router.add_get("/ready", handlers.ready)
    for mode in handlers.MODES:
        app.router.add_post(f"/api/v1/generate/{mode}", handlers.submit_handler(mode), expect_handler=later)
    app.router.add_get("/api/v1/models", models.list_models)
    app.router.add_get("/api/v1/model/info", models.model_info)
    app.router.add_post("/api/v1/models/download", handlers.download_model, expect_handler=later)
    app.router.add_get("/api/v1/jobs", jobs.list_jobs)
    app.router.add_get("/api/v1/jobs/{job_id}", jobs.get_job)
    app.router.add_get("/api/v1/job/{job_id}", jobs.get_job)  # the seed's path
    app.router.add_get("/outputs/{job_id}.mp4", jobs.job_output)  # the seed's static-file path
    app.router.add_post("/api/v1/jobs/{job_id}/cancel", jobs.cancel_job)
    app.router.add_delete("/api/v1/jobs/{job_id}", jobs.cancel_job)
    app.router.add_get("/api/v1/ws", ws.job_events)
    app.router.add_get("/api/v1/events", ws.job_events_sse)
    openai_api.add_routes(app)
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
    app.on_response_prepare.append(_vary_on_origin)


async def _vary_on_origin(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer may depend on the request's `Origin` (its CORS headers do): a cache between
    the gateway and browsers must not give one origin's answer to another."""
    vary = response.headers.get("Vary", "")
    if "origin" not in vary.lower():
        response.headers["Vary"] = f"{vary}, Origin" if vary else "Origin"


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    store = ObjectStore(settings, public_endpoint=settings.s3_public_endpoint)
    days = settings.output_retention_days
    try:
        await store.ensure_bucket()
    except Exception as exc:  # /ready reports it; the gateway still starts and recovers when the store does
        log.warning("store_unreachable_at_start", error=str(exc))
    else:
        try:
            # Set, the rules expire jobs after the days; unset, rules an earlier start set are removed.
            if await store.expire_after(RETAINED_PREFIXES, days):
                log.info("retention_set" if days else "retention_removed", days=days, prefixes=RETAINED_PREFIXES)
        except Exception as exc:  # the rules as they were; tried again at the next start
            if days is None and not isinstance(exc, ForeignLifecycleRules):
                # Unset, a store without lifecycle rules (or the right to read them) is no problem.
                log.info("retention_not_applied", days=days, error=str(exc))
            else:
                log.warning("retention_not_applied", days=days, error=str(exc))
    app[STORE] = store
    yield
    await store.close()


def _release_quota_on_end(app: web.Application) -> None:
    """Every gateway sees every terminal event: each removes the job's quota marker (see gateway/quota.py)."""
    store, pending = app[STORE], set()

    async def release(record: JobRecord) -> None:
        try:
            await quota.release(store, record)
        except Exception as exc:  # the next check at the quota finds the ended job and clears it
            log.warning("quota_release_failed", job_id=record.job_id, error=str(exc))

    def listener(event: JobEvent) -> None:
        if event.job is not None and event.status.is_terminal:
            task = asyncio.ensure_future(release(event.job))
            pending.add(task)
            task.add_done_callback(pending.discard)

    app[HUB].listeners.append(listener)


async def _broker_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    if app[KEYS] is not None:
        _release_quota_on_end(app)
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
    yield
    if app[SUBMISSIONS]:  # requests cancelled at shutdown whose jobs are still being queued
        await asyncio.wait(app[SUBMISSIONS], timeout=SUBMISSION_GRACE_S)
    if deliverer is not None:
        await deliverer.close()
    await broker.close()


async def _close_streams(app: web.Application) -> None:
    app[HUB].close_all()
