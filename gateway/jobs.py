"""Job handlers: read one, cancel one, list many (newest first)."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import structlog
from aiohttp import web

from common.store import index_prefix, job_id_of_index, model_of_index
from gateway.auth import owner_of, visible
from gateway.errors import ApiError, problem, reads_query
from gateway.handlers import announce, ascii_int, parse_job_id
from gateway.keys import BROKER, REGISTRY, SETTINGS, STORE
from gateway.views import job_view
from schemas.api import JobList
from schemas.jobs import JobRecord, JobStatus, Phase, utcnow

log = structlog.get_logger("gateway")

LIST_LIMIT_MAX = 100
_CURSOR = re.compile(r"index/(owners/[a-z0-9][a-z0-9_-]*/)?jobs/[0-9]{13}-[0-9a-f-]{36}(\.[a-z0-9-]+)?")


async def _load(request: web.Request) -> JobRecord:
    return await load_visible(request, request.match_info["job_id"])


async def load_visible(request: web.Request, job_id: str) -> JobRecord:
    """The job, if it exists and the caller's key may see it; 404 otherwise (the same for both)."""
    job_id = parse_job_id(job_id)
    record = await request.app[STORE].get_record(job_id)
    if record is None or not visible(record, owner_of(request)):
        raise ApiError(404, "job_not_found", f"no job with id {job_id!r}")
    return record


def _view(request: web.Request, record: JobRecord) -> dict[str, Any]:
    return job_view(record, request.app[STORE], request.app[SETTINGS].presign_expiry_s).model_dump(mode="json")


async def get_job(request: web.Request) -> web.Response:
    return web.json_response(_view(request, await _load(request)))


async def load_video(request: web.Request, job_id: str) -> JobRecord:
    """The job behind a video: as `load_visible`, generation jobs only (a model download is no video)."""
    record = await load_visible(request, job_id)
    if record.mode == "download":
        raise ApiError(404, "job_not_found", f"no video with id {record.job_id!r}")
    return record


async def job_output(request: web.Request) -> web.Response:
    """`GET /outputs/<job_id>.mp4`: a `302` to the job's video, through a fresh presigned link."""
    record = await load_video(request, request.match_info["job_id"])
    raise video_redirect(request, record, f"job {record.job_id} has no video ({record.status.value})")


def video_redirect(request: web.Request, record: JobRecord, not_ready: str) -> web.HTTPFound:
    """The redirect to the job's video, through a fresh link presigned for the request's method
    (a HEAD gets a HEAD link: the store refuses one signed for GET); while the job has none,
    404 `video_not_ready` with the message `not_ready`."""
    if record.output is None:
        raise ApiError(404, "video_not_ready", not_ready)
    method = "HEAD" if request.method == "HEAD" else "GET"
    url, _ = request.app[STORE].presign(record.output.key, request.app[SETTINGS].presign_expiry_s, method)
    return web.HTTPFound(url)


async def cancel_job(request: web.Request) -> web.Response:
    """200 with the cancelled job if it had not started; 202 while a running job stops at its next
    denoising step (or after its decode, encoding or upload); 409 if it already ended."""
    record, status = await cancel(request, await _load(request))
    return web.json_response(_view(request, record), status=status)


def cancelled_if_queued(
    record: JobRecord, message: str = "cancelled before it started", **changes: Any
) -> JobRecord | None:
    """The record moved on to `cancelled`, or None if a worker has started the job or it ended.
    For `update_record`: a worker that starts the job meanwhile wins, and then it is the
    worker's to end."""
    if record.status.is_terminal or record.status == JobStatus.RUNNING:
        return None
    return record.advance(status=JobStatus.CANCELLED, phase=Phase.CANCELLED, message=message, **changes)


def cancelled_or_cancel_requested(record: JobRecord) -> JobRecord | None:
    """For `update_record`: a queued job cancelled; a running generation job marked with the
    request (its worker finds the mark at its next write of the record, a worker that gets the job
    again after a crash finds it before it starts); anything else left be."""
    if record.status == JobStatus.RUNNING and record.mode != "download":
        if record.cancel_requested_at is not None:
            return None
        return record.model_copy(update={"cancel_requested_at": utcnow()})
    return cancelled_if_queued(record)


async def cancel(request: web.Request, record: JobRecord) -> tuple[JobRecord, int]:
    """Cancel a job: (the job now, 200) if it ended or had not started, (the job, 202) while a running
    job stops; 409 if it had already ended."""
    if record.status.is_terminal:
        raise ApiError(409, "job_finished", f"job {record.job_id} already ended ({record.status}); nothing to cancel")
    if record.status == JobStatus.RUNNING and record.mode == "download":
        raise ApiError(409, "not_cancellable", "a model download cannot be stopped once it runs")
    # Every worker hears it: the one running the job stops it at once; one that receives it later
    # drops it. Without the broker the record still carries the cancel (below), a little later.
    try:
        await request.app[BROKER].publish_cancel(record.job_id)
    except Exception as exc:
        log.warning("cancel_not_sent", job_id=record.job_id, error=str(exc))
    now, changed = await request.app[STORE].update_record(record.job_id, cancelled_or_cancel_requested)
    if now is None:
        raise ApiError(404, "job_not_found", f"no job with id {record.job_id!r}")
    if now.status == JobStatus.RUNNING:
        if now.mode == "download":
            raise ApiError(409, "not_cancellable", "a model download cannot be stopped once it runs")
        return now, 202
    if changed and now.status == JobStatus.CANCELLED:
        await announce(request, now)
        log.info("job_cancelled", job_id=record.job_id, before="queued")
    return now, 200


def _list_problems(request: web.Request) -> tuple[list[tuple[str, str, str]], dict[str, Any]]:
    query, registry = request.query, request.app[REGISTRY]
    problems: list[tuple[str, str, str]] = []
    status = query.get("status")
    if status is not None and status not in {s.value for s in JobStatus}:
        problems.append(("status", "enum", f"status must be one of {', '.join(s.value for s in JobStatus)}"))
    model = query.get("model")
    if model is not None and registry.get(model) is None:
        problems.append(("model", "known_model", registry.unknown(model)))
    limit = 20
    try:
        limit = ascii_int(query.get("limit", "20"))
        if not 1 <= limit <= LIST_LIMIT_MAX:
            raise ValueError
    except ValueError:
        problems.append(("limit", "range", f"limit must be an integer from 1 to {LIST_LIMIT_MAX}"))
    prefix = index_prefix(owner_of(request))
    cursor = query.get("cursor")
    if cursor is not None and not (_CURSOR.fullmatch(cursor) and cursor.startswith(prefix)):
        problems.append(("cursor", "opaque", "cursor must be the next_cursor of an earlier page of the same listing"))
    return problems, {"status": status, "model": model, "prefix": prefix, "limit": limit, "cursor": cursor}


@reads_query("status", "model", "limit", "cursor")
async def list_jobs(request: web.Request) -> web.Response:
    """`GET /api/v1/jobs?status=&model=&limit=&cursor=`: newest first, a page at a time.

    The index lists the caller's jobs newest first, each entry named with its model; a model
    filter skips other models' entries by name, a status filter reads the records. A filtered
    page stops after scanning a bounded number of entries, with a cursor to go on from there.
    """
    problems, args = _list_problems(request)
    if problems:
        raise ApiError(
            422,
            "validation_error",
            "; ".join(p[2] for p in problems),
            [problem(f, r, m) for f, r, m in problems],
        )
    store, status, model, limit = request.app[STORE], args["status"], args["model"], args["limit"]
    budget = max(limit * 5, 200) if status else max(limit * 10, 1000) if model else limit
    jobs: list[dict[str, Any]] = []
    scanned, last_key = 0, args["cursor"]
    while len(jobs) < limit and scanned < budget:
        keys = await store.list_keys(args["prefix"], last_key, min(200 if model else 50, budget - scanned))
        if not keys:
            break
        wanted = [k for k in keys if model is None or model_of_index(k) in (model, None)]
        if status is None and len(wanted) > limit - len(jobs):
            # Without a status filter every entry read fills the page: read no more than it needs,
            # and scan no further than the last of them (the cursor goes on from there).
            wanted = wanted[: limit - len(jobs)]
            keys = keys[: keys.index(wanted[-1]) + 1]
        found = await asyncio.gather(*(store.get_record(job_id_of_index(key)) for key in wanted))
        records = dict(zip(wanted, found, strict=True))
        for key in keys:
            scanned, last_key = scanned + 1, key
            record = records.get(key)
            listed = record is not None and visible(record, owner_of(request))
            if listed and (status is None or record.status == status) and model in (None, record.model):
                jobs.append(_view(request, record))
                if len(jobs) == limit:
                    break
    more = last_key is not None and bool(await store.list_keys(args["prefix"], last_key, 1))
    return web.json_response(JobList(jobs=jobs, next_cursor=last_key if more else None).model_dump(mode="json"))
