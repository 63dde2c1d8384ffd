"""HTTP handlers: submit, query, health."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import structlog
from aiohttp import web
from pydantic import ValidationError

from gateway.errors import ApiError, validation_error
from gateway.keys import BROKER, HUB, REGISTRY, SETTINGS, STORE
from gateway.views import job_view
from schemas.jobs import JobError, JobRecord, JobStatus, Mode, Phase, utcnow
from schemas.messages import JobEvent, JobMessage
from schemas.requests import JobAccepted, TextToVideoRequest

log = structlog.get_logger("gateway")

_JOB_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def parse_job_id(value: str | None) -> str:
    """Job ids are UUIDs we made; anything else cannot name a job (and never reaches a store key)."""
    if value is None or not _JOB_ID.match(value):
        raise ApiError(404, "job_not_found", f"no job with id {value!r}")
    return value


async def read_json(request: web.Request) -> Any:
    if request.content_type != "application/json":
        raise ApiError(415, "unsupported_media_type",
                       f"expected Content-Type application/json, got {request.content_type!r}")
    body = await request.read()
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, "invalid_json", f"request body is not valid JSON: {exc}") from exc


async def submit_text_to_video(request: web.Request) -> web.Response:
    payload = await read_json(request)
    if not isinstance(payload, dict):
        raise ApiError(422, "validation_error", "request body must be a JSON object",
                       [{"field": "body", "rule": "object", "message": "request body must be a JSON object"}])
    try:
        req = TextToVideoRequest.model_validate(payload)
    except ValidationError as exc:
        raise validation_error(exc) from exc
    return await _submit(request, req, "text-to-video")


async def _submit(request: web.Request, req: TextToVideoRequest, mode: Mode) -> web.Response:
    app = request.app
    params, problems = app[REGISTRY].resolve(req, mode)
    if problems:
        raise ApiError(422, "validation_error", "; ".join(p.message for p in problems),
                       [p.model_dump() for p in problems])
    assert params is not None
    now = utcnow()
    record = JobRecord(job_id=str(uuid.uuid4()), mode=mode, model=params.model, status=JobStatus.QUEUED,
                       phase=Phase.QUEUED, progress=0.0, seq=0, created_at=now, updated_at=now, params=params)
    # The record is written before the job is published, so a worker always finds it.
    try:
        await app[STORE].put_record(record)
    except Exception as exc:
        log.error("store_write_failed", job_id=record.job_id, error=str(exc))
        raise ApiError(503, "store_unavailable", "the object store is unavailable; retry later",
                       headers={"Retry-After": "5"}) from exc
    broker = app[BROKER]
    try:
        await broker.publish_job(JobMessage(job_id=record.job_id, mode=mode, params=params))
    except Exception as exc:
        log.error("publish_failed", job_id=record.job_id, error=str(exc))
        await _mark_unpublished(request, record)
        raise ApiError(503, "broker_unavailable", "the job could not be queued; retry later",
                       headers={"Retry-After": "5"}) from exc
    queued = JobEvent.from_record(record)
    # Straight into this gateway's hub as well, so a client that connects right after the 202
    # starts from seq 0 even before the broker's copy comes back.
    app[HUB].publish(queued)
    try:
        await broker.publish_event(queued)
    except Exception as exc:  # the job is safely queued; the record already says so
        log.warning("queued_event_failed", job_id=record.job_id, error=str(exc))
    log.info("job_accepted", job_id=record.job_id, model=params.model, mode=mode)
    accepted = JobAccepted(job_id=record.job_id, status=record.status, model=params.model, request=params,
                           links={"self": f"/api/v1/jobs/{record.job_id}",
                                  "events": f"/api/v1/ws?job_id={record.job_id}"})
    return web.json_response(accepted.model_dump(mode="json"), status=202,
                             headers={"Location": f"/api/v1/jobs/{record.job_id}"})


async def _mark_unpublished(request: web.Request, record: JobRecord) -> None:
    failed = record.model_copy(update={
        "status": JobStatus.FAILED, "phase": Phase.FAILED, "seq": 1, "updated_at": utcnow(),
        "finished_at": utcnow(), "error": JobError(code="not_queued", message="the broker did not accept the job"),
    })
    try:
        await request.app[STORE].put_record(failed)
    except Exception as exc:
        log.error("store_write_failed", job_id=record.job_id, error=str(exc))


async def get_job(request: web.Request) -> web.Response:
    job_id = parse_job_id(request.match_info["job_id"])
    record = await request.app[STORE].get_record(job_id)
    if record is None:
        raise ApiError(404, "job_not_found", f"no job with id {job_id!r}")
    view = job_view(record, request.app[STORE], request.app[SETTINGS].presign_expiry_s)
    return web.json_response(view.model_dump(mode="json"))


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    broker_ok = request.app[BROKER].connected
    store_ok = await request.app[STORE].ping()
    body = {"status": "ready" if broker_ok and store_ok else "unavailable",
            "broker": "ok" if broker_ok else "unreachable", "store": "ok" if store_ok else "unreachable"}
    return web.json_response(body, status=200 if broker_ok and store_ok else 503)
