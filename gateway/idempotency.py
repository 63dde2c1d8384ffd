"""`Idempotency-Key` on submissions: the same key and body within the window return the original
job; the same key with another body is refused. Keys live in the object store, hashed."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from gateway.errors import ApiError
from gateway.keys import SETTINGS, STORE
from schemas.jobs import utcnow

HEADER = "Idempotency-Key"


class Remembered(BaseModel):
    fingerprint: str
    job_id: str
    created_at: datetime


def key_of(request: web.Request) -> str | None:
    key = request.headers.get(HEADER)
    if key is None:
        return None
    if not 1 <= len(key) <= 255 or not key.isprintable() or not key.isascii():
        raise ApiError(400, "bad_header", f"{HEADER} must be 1 to 255 printable ASCII characters")
    return key


def fingerprint(mode: str, request_body: BaseModel, data: bytes | None) -> str:
    """What makes two submissions the same: mode, fields as sent, and the uploaded file's bytes."""
    fields = request_body.model_dump(mode="json", exclude={"image", "video"})
    document = {"mode": mode, "fields": fields, "input": None if data is None else hashlib.sha256(data).hexdigest()}
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


def _object_key(key: str) -> str:
    return f"idempotency/{hashlib.sha256(key.encode()).hexdigest()}.json"


async def earlier_job(request: web.Request, key: str, print_: str) -> str | None:
    """The job an earlier submission with this key made, if within the window and the same body."""
    raw = await request.app[STORE].get_bytes(_object_key(key))
    if raw is None:
        return None
    remembered = Remembered.model_validate_json(raw)
    if utcnow() - remembered.created_at > timedelta(seconds=request.app[SETTINGS].idempotency_window_s):
        return None
    if remembered.fingerprint != print_:
        message = (
            f"{HEADER}: this key was used for a different request (job {remembered.job_id}); "
            "use a new key for a new request"
        )
        raise ApiError(
            422,
            "validation_error",
            message,
            [{"field": HEADER, "rule": "reused_with_different_body", "message": message}],
        )
    return remembered.job_id


async def remember(request: web.Request, key: str, print_: str, job_id: str) -> None:
    body: dict[str, Any] = Remembered(fingerprint=print_, job_id=job_id, created_at=utcnow()).model_dump(mode="json")
    await request.app[STORE].put_bytes(_object_key(key), json.dumps(body).encode(), "application/json")
