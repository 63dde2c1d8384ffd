"""`Idempotency-Key` on submissions: the same key and body within the window return the original
job; the same key with another body is refused. Keys live in the object store, hashed, scoped to
the API key that sent them (two callers' keys never meet).

Concurrent first uses of one key are made one at a time (`claim`): within a gateway by a lock,
across gateways by an exclusive queue on the broker, which only one connection can hold. Should
that fail (a gateway whose broker connection dropped while it held the queue), the key's record
is still written only over the version the submission read (`remember`): of two submissions
that both made a job, one remembers its job and the other finds the key taken (`KeyTaken`)."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Any
from weakref import WeakValueDictionary

import structlog
from aiohttp import web
from pydantic import BaseModel, ValidationError

from common.store import RecordChanged
from gateway.auth import owner_of
from gateway.errors import ApiError, problem
from gateway.keys import BROKER, SETTINGS, STORE
from schemas.jobs import utcnow

log = structlog.get_logger("gateway.idempotency")

HEADER = "Idempotency-Key"


class Remembered(BaseModel):
    fingerprint: str
    job_id: str
    created_at: datetime


def key_of(request: web.Request) -> str | None:
    keys = request.headers.getall(HEADER, [])
    if len(keys) > 1:  # which one was meant?
        raise ApiError(400, "bad_header", f"{HEADER} given {len(keys)} times; send it once")
    if not keys:
        return None
    key = keys[0]
    if not 1 <= len(key) <= 255 or not key.isprintable() or not key.isascii():
        raise ApiError(400, "bad_header", f"{HEADER} must be 1 to 255 printable ASCII characters")
    return key


def fingerprint(mode: str, request_body: BaseModel, data: bytes | None) -> str:
    """What makes two submissions the same: mode, fields as sent, and the uploaded file's bytes."""
    fields = request_body.model_dump(mode="json", exclude={"image", "video"})
    document = {"mode": mode, "fields": fields, "input": None if data is None else hashlib.sha256(data).hexdigest()}
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


# How long a submission waits for a concurrent one with the same key before answering 409.
CLAIM_TIMEOUT_S = 30.0

_locks: WeakValueDictionary[str, asyncio.Lock] = WeakValueDictionary()


def _digest(request: web.Request, key: str) -> str:
    return hashlib.sha256(f"{owner_of(request) or ''}\n{key}".encode()).hexdigest()


def _object_key(request: web.Request, key: str) -> str:
    return f"idempotency/{_digest(request, key)}.json"


@asynccontextmanager
async def claim(request: web.Request, key: str) -> AsyncIterator[None]:
    """Hold the key while its submission is looked up and, if new, made."""
    digest = _digest(request, key)
    lock = _locks.get(digest)
    if lock is None:
        lock = _locks[digest] = asyncio.Lock()
    try:
        async with asyncio.timeout(CLAIM_TIMEOUT_S):
            await lock.acquire()
    except TimeoutError as exc:
        raise busy() from exc
    try:
        try:
            held = request.app[BROKER].exclusive(f"idempotency.{digest}", CLAIM_TIMEOUT_S)
            await held.__aenter__()
        except TimeoutError as exc:
            raise busy() from exc
        except Exception as exc:
            raise ApiError(
                503, "broker_unavailable", "the broker is unavailable; retry later", headers={"Retry-After": "5"}
            ) from exc
        try:
            yield
        finally:
            await held.__aexit__(None, None, None)
    finally:
        lock.release()


def busy() -> ApiError:
    return ApiError(
        409,
        "idempotency_key_in_use",
        f"another request with this {HEADER} is still being handled; retry it",
        headers={"Retry-After": "1"},
    )


class KeyTaken(RecordChanged):
    """Another submission remembered a job under the key after this one looked it up."""


async def earlier_job(request: web.Request, key: str, print_: str) -> tuple[str | None, str | None]:
    """(The job an earlier submission with this key made, if within the window and the same
    body; the ETag of the key's record, for `remember`, None if there is none)."""
    found = await request.app[STORE].get_tagged(_object_key(request, key))
    if found is None:
        return None, None
    raw, etag = found
    try:
        remembered = Remembered.model_validate_json(raw)
    except ValidationError:  # not written by a gateway of this version: the key is free again
        log.error("idempotency_record_unreadable", key=_object_key(request, key))
        return None, etag
    if utcnow() - remembered.created_at > timedelta(seconds=request.app[SETTINGS].idempotency_window_s):
        return None, etag
    if remembered.fingerprint != print_:
        message = (
            f"{HEADER}: this key was used for a different request (job {remembered.job_id}); "
            "use a new key for a new request"
        )
        raise ApiError(
            422,
            "validation_error",
            message,
            [problem(HEADER, "reused_with_different_body", message)],
        )
    return remembered.job_id, etag


async def remember(request: web.Request, key: str, print_: str, job_id: str, etag: str | None) -> None:
    """Remember the job under the key, over the version `earlier_job` read; KeyTaken if another
    submission wrote the key's record since."""
    body: dict[str, Any] = Remembered(fingerprint=print_, job_id=job_id, created_at=utcnow()).model_dump(mode="json")
    try:
        await request.app[STORE].put_if(_object_key(request, key), json.dumps(body).encode(), etag)
    except RecordChanged as exc:
        # An earlier try of this very write may have been stored with its answer lost: the key
        # then names this job, and is this submission's, not another's.
        found = await request.app[STORE].get_tagged(_object_key(request, key))
        if found is not None and _names(found[0], job_id, print_):
            return
        raise KeyTaken() from exc


def _names(raw: bytes, job_id: str, print_: str) -> bool:
    try:
        remembered = Remembered.model_validate_json(raw)
    except ValidationError:
        return False
    return remembered.job_id == job_id and remembered.fingerprint == print_
