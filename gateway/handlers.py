"""HTTP handlers: submit jobs (three modes and model downloads), query jobs, health."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import email.message
import json
import math
import re
import sys
import typing
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import structlog
from aiohttp import BodyPartReader, HttpVersion11, hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from pydantic import BaseModel, ValidationError

from common.retry import patiently
from common.store import index_key, input_key
from gateway import idempotency, quota
from gateway.auth import owner_of, require_admin
from gateway.broker import QueueStats
from gateway.errors import (
    CONTINUE_PENDING,
    ApiError,
    bad_field,
    problem,
    store_call,
    store_unavailable,
    validation_error,
)
from gateway.inputs import CheckedInput, bad_input, check_image, check_video
from gateway.keys import BROKER, HUB, REGISTRY, SETTINGS, STORE, SUBMISSIONS, UPLOAD_SLOTS, UPLOAD_SLOTS_BY_KEY
from gateway.metrics import SUBMITTED
from gateway.webhooks import destination_problem
from schemas.api import Health, Readiness
from schemas.cost import DoesNotFit, Estimate, estimate_job
from schemas.errors import shown
from schemas.jobs import (
    DEFAULT_WEBHOOK_EVENTS,
    DownloadParams,
    GenerationMode,
    GenerationParams,
    JobError,
    JobRecord,
    JobStatus,
    Mode,
    Phase,
    Priority,
    Webhook,
    utcnow,
)
from schemas.messages import JobEvent, JobMessage
from schemas.requests import DownloadRequest, ImageToVideoRequest, JobAccepted, TextToVideoRequest, VideoToVideoRequest

T = TypeVar("T")
log = structlog.get_logger("gateway")

# How long a submission keeps trying to store its Idempotency-Key's record through store errors.
REMEMBER_PATIENCE_S = 5.0
# A model's queues may hold this many times its max_queue_depth in all, counting the messages of
# jobs that ended while queued (see _queue_full).
ENDED_ALLOWANCE = 10
_JOB_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")

# Mode → (request model, name of its file input or None).
MODES: dict[GenerationMode, tuple[type[TextToVideoRequest], str | None]] = {
    "text-to-video": (TextToVideoRequest, None),
    "image-to-video": (ImageToVideoRequest, "image"),
    "video-to-video": (VideoToVideoRequest, "video"),
}
MAX_FORM_FIELD_BYTES = 64 * 1024
MAX_FORM_FIELDS = 32  # the requests have about 15
# The record of the job a request has just queued, for handlers that answer with more than JobAccepted.
QUEUED_RECORD = web.RequestKey("queued_record", JobRecord)
# Set by a submission with an Idempotency-Key: its job's `queued` event waits until the key is
# remembered (a duplicate that another submission's job beat is cancelled, without webhooks).
ANNOUNCE_LATER = web.RequestKey("announce_later", bool)


def parse_job_id(value: str | None) -> str:
    """Job ids are UUIDs we made; anything else cannot name a job (and never reaches a store key)."""
    if value is None or not _JOB_ID.fullmatch(value):
        raise ApiError(404, "job_not_found", f"no job with id {value if value is None else shown(value)}")
    return value


async def expect_continue_later(request: web.Request) -> None:
    """Expect handler of the routes with a body: "100 Continue" is sent only once the handler
    starts reading the body (`continue_now`), so a request refused on its headers alone (its
    Content-Length over the limit, its Content-Type, its key) gets its answer without having
    been invited to upload the body first."""
    if request.version != HttpVersion11:  # HTTP/1.0 knows no Expect: ignored, as aiohttp does
        return
    expect = request.headers.get(hdrs.EXPECT, "")
    if expect.lower() != "100-continue":
        raise web.HTTPExpectationFailed(text=f"Unknown Expect: {expect}")
    request[CONTINUE_PENDING] = True


async def continue_now(request: web.Request) -> None:
    if request.pop(CONTINUE_PENDING, False):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the response proper has not started


async def read_body(request: web.Request, limit: int) -> bytes:
    """The body, at most `limit` bytes (a Content-Length over it is refused by check_json_headers)."""
    await continue_now(request)
    chunks, size = [], 0
    while chunk := await request.content.read(65536):
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "body_too_large", f"request body is larger than the limit of {limit} bytes")


def _upload_too_large(field: str, limit: int) -> ApiError:
    message = f"{field}: larger than the limit of {limit} bytes"
    return ApiError(413, "body_too_large", message, [problem(field, "max_bytes", message)])


# Python reads integers of at most this many digits (sys.get_int_max_str_digits()).
MAX_DIGITS = sys.get_int_max_str_digits()


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all different: with a key twice, which value was meant?"""
    value = dict(pairs)
    if len(value) != len(pairs):
        seen: set[str] = set()
        twice = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise ValueError(f"the key {shown(twice)} appears more than once in an object")
    return value


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: no JSON number a field could take
        raise ValueError(f"{shown(text)} is too large a number")
    if value == 0 and re.search(r"[1-9]", re.split(r"[eE]", text)[0]):  # 1e-400: not 0, but rounds to it
        raise ValueError(f"{shown(text)} is too small a number (it is not 0, and rounds to 0)")
    return value


def check_json_headers(request: web.Request, limit: int, or_multipart: bool = False) -> None:
    """What can be refused of a JSON body before it is read: its Content-Type (`or_multipart`: the
    route also takes multipart/form-data, and the 415 says so), its charset, its Content-Length."""
    if request.content_type != "application/json":
        expected = "application/json or multipart/form-data" if or_multipart else "application/json"
        # Without the header (or with an empty one) aiohttp reports application/octet-stream.
        sent = request.headers.get(hdrs.CONTENT_TYPE, "").strip()
        got = f"got {request.content_type!r}" if sent else "but the request sent no Content-Type"
        raise ApiError(415, "unsupported_media_type", f"expected Content-Type {expected}, {got}")
    if request.charset is not None and request.charset.lower() != "utf-8":
        raise ApiError(
            415,
            "unsupported_media_type",
            f"JSON bodies must be UTF-8: the Content-Type's charset may only be utf-8, got {shown(request.charset)}",
        )
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)


async def read_json(request: web.Request, limit: int, or_multipart: bool = False) -> dict[str, Any]:
    """The JSON object of the body (see check_json_headers)."""
    check_json_headers(request, limit, or_multipart)
    body = await read_body(request, limit)
    try:
        # Decoded here, strictly: json.loads would take UTF-16 and UTF-32 bodies, and a byte
        # order mark, as they came.
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(
            400, "invalid_json", f"request body is not valid JSON: not UTF-8 ({exc.reason} at byte {exc.start})"
        ) from exc
    if text.startswith("\ufeff"):
        raise ApiError(
            400, "invalid_json", "request body is not valid JSON: it starts with a byte order mark; send it without one"
        )
    try:
        payload = json.loads(text, parse_constant=_not_json, parse_float=_finite, object_pairs_hook=_object)
    except ValueError as exc:  # not JSON, a key twice, or an integer beyond Python's digit limit
        if "\x00" in text:  # UTF-16 or UTF-32 without a byte order mark decodes, with NULs
            raise ApiError(
                400, "invalid_json", "request body is not valid JSON: it holds NUL characters; send it in UTF-8"
            ) from exc
        if "integer string conversion" in str(exc):  # Python's own words for it
            raise ApiError(
                400, "invalid_json", f"request body is not valid JSON: a number of more than {MAX_DIGITS} digits"
            ) from exc
        raise ApiError(400, "invalid_json", f"request body is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise ApiError(400, "invalid_json", "request body is not valid JSON: nested too deeply") from exc
    if not isinstance(payload, dict):
        raise ApiError(
            422,
            "validation_error",
            "request body must be a JSON object",
            [problem("body", "object", "request body must be a JSON object")],
        )
    return payload


def check_multipart_headers(request: web.Request, limit: int) -> None:
    """What can be refused of a multipart body whose file may have `limit` bytes before it is
    read: its Content-Length, a Content-Type without a boundary."""
    body_limit = limit + MAX_FORM_FIELDS * MAX_FORM_FIELD_BYTES
    if request.content_length is not None and request.content_length > body_limit:
        raise _too_large(body_limit)
    content_type = email.message.Message()
    content_type["Content-Type"] = request.headers.get(hdrs.CONTENT_TYPE, "")
    if not content_type.get_param("boundary"):  # missing, or empty (then a bare "--" would delimit parts)
        raise ApiError(400, "bad_request", "malformed multipart body: the Content-Type has no boundary")


async def read_multipart(request: web.Request, file_field: str, limit: int) -> tuple[dict[str, str], bytes | None]:
    """Form fields as strings (pydantic parses the numbers) and the one file, each bounded, and
    at most MAX_FORM_FIELDS fields: a body holds at most `limit` + MAX_FORM_FIELDS x
    MAX_FORM_FIELD_BYTES bytes in memory."""
    fields: dict[str, str] = {}
    data: bytes | None = None
    check_multipart_headers(request, limit)
    try:
        await continue_now(request)
        reader = await request.multipart()
    except ValueError as exc:  # e.g. no boundary in the Content-Type
        raise ApiError(400, "bad_request", f"malformed multipart body: {exc}") from exc
    try:
        seen: set[str] = set()
        async for part in reader:
            if len(fields) >= MAX_FORM_FIELDS:
                raise ApiError(
                    400, "bad_request", f"a multipart body may have at most {MAX_FORM_FIELDS} fields besides its file"
                )
            if not isinstance(part, BodyPartReader):
                raise ApiError(400, "bad_request", "nested multipart bodies are not accepted")
            if not part.name:
                raise ApiError(
                    400, "bad_request", "a multipart part has no name (Content-Disposition: form-data; name=...)"
                )
            if not _utf8(part.name):  # a name in other bytes than UTF-8's arrives with surrogates
                raise ApiError(400, "bad_request", f"a multipart part's name is not valid UTF-8: {part.name!a}")
            if part.name in seen:
                raise bad_input(part.name, "single_value", f"{part.name}: given more than once; send each field once")
            seen.add(part.name)
            if part.name == file_field:
                data = await _read_part(part, limit)
            elif part.filename is not None:
                raise bad_input(
                    part.name, "extra_forbidden", f"{part.name}: unexpected file; the only file field is {file_field!r}"
                )
            else:
                try:
                    fields[part.name] = (await _read_part(part, MAX_FORM_FIELD_BYTES)).decode()
                except UnicodeDecodeError:
                    raise bad_input(part.name, "utf8", f"{part.name}: not valid UTF-8 text") from None
    except (ValueError, HttpProcessingError) as exc:  # a missing or wrong boundary, a body cut short, a bad part header
        reason = str(getattr(exc, "message", None) or exc)
        if "EOF" in reason:  # aiohttp's "Reading after EOF"
            reason = "it ends before its closing boundary (--BOUNDARY--)"
        raise ApiError(400, "bad_request", f"malformed multipart body: {reason}") from exc
    return fields, data


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


async def _read_part(part: BodyPartReader, limit: int) -> bytes:
    chunks, size = [], 0
    while chunk := await part.read_chunk():
        size += len(chunk)
        if size > limit:
            raise _upload_too_large(str(part.name), limit)
        chunks.append(chunk)
    return b"".join(chunks)


# Base64 is decoded this many characters at a time (a multiple of 4), off the event loop: the
# decoder holds the GIL while it runs (about 0.6 s for a 100 MiB file in one call), and between
# pieces the event loop gets its turn.
BASE64_PIECE = 1 << 20


async def _decode_base64(field: str, text: str) -> bytes:
    # A data URL is accepted too: its data starts after the first comma (read in place, not copied).
    begin = text.index(",") + 1 if text.startswith("data:") and "," in text else 0
    try:
        if len(text) - begin <= BASE64_PIECE:
            return base64.b64decode(text[begin:], validate=True)
        return await asyncio.to_thread(_decode_base64_in_pieces, text, begin)
    except (binascii.Error, ValueError) as exc:
        reason = str(exc).strip("()")
        if reason == "Only base64 data is allowed":  # binascii's words for any other character
            reason = "a character outside the base64 alphabet (A-Z, a-z, 0-9, +, /, = at the end), or a line break"
        raise bad_input(field, "base64", f"{field}: not valid base64: {reason}") from exc


def _decode_base64_in_pieces(text: str, begin: int) -> bytes:
    """As `b64decode(text[begin:], validate=True)`: padding only at the very end."""
    last = len(text) - BASE64_PIECE
    pieces = []
    for start in range(begin, len(text), BASE64_PIECE):
        piece = text[start : start + BASE64_PIECE]
        if start < last and "=" in piece:
            raise ValueError("padding before the end of the data")
        pieces.append(base64.b64decode(piece, validate=True))
    return b"".join(pieces)


def submit_handler(mode: GenerationMode):
    async def handler(request: web.Request) -> web.Response:
        return await submit(request, mode)

    handler.__name__ = f"submit_{mode.replace('-', '_')}"
    return handler


# How long a submission that may carry a file waits for its turn to be read (upload_slot).
UPLOAD_WAIT_S = 30.0


@asynccontextmanager
async def upload_slot(request: web.Request) -> AsyncIterator[None]:
    """Hold one of the gateway's `max_concurrent_uploads` slots while a body that may carry a file
    (larger than `max_body_bytes`, or of unknown length) is read, checked and stored: each is held
    in memory, several times over while it is parsed (a 100 MiB file in JSON about 0.4 GiB at its
    peak), so how many at once bounds the gateway's memory. One API key holds at most half the
    slots (at least one): a key whose uploads come slowly cannot hold them all. A request waits
    for its turn up to UPLOAD_WAIT_S (its body unread), then gets 503 `uploads_busy`."""
    settings = request.app[SETTINGS]
    if request.content_length is not None and request.content_length <= settings.max_body_bytes:
        yield
        return
    slots, per_key = request.app[UPLOAD_SLOTS], request.app[UPLOAD_SLOTS_BY_KEY]
    share = max(1, settings.max_concurrent_uploads // 2)
    mine = per_key.setdefault(owner_of(request) or "", asyncio.Semaphore(share))
    held = []
    try:
        async with asyncio.timeout(UPLOAD_WAIT_S):
            for semaphore in (mine, slots):  # the key's share first: its waits take no gateway slot
                await semaphore.acquire()
                held.append(semaphore)
    except TimeoutError:
        for semaphore in held:
            semaphore.release()
        whose = "this API key's" if not held else "the gateway's"
        log.warning("uploads_busy", waited_s=UPLOAD_WAIT_S, slots=settings.max_concurrent_uploads, per_key=not held)
        raise ApiError(
            503,
            "uploads_busy",
            f"{whose} uploads are all being read ({share if not held else settings.max_concurrent_uploads} at "
            f"once) and this one waited {UPLOAD_WAIT_S:g} s for its turn; retry later",
            headers={"Retry-After": "5"},
        ) from None
    try:
        yield
    finally:
        for semaphore in held:
            semaphore.release()


async def submit(request: web.Request, mode: GenerationMode) -> web.Response:
    if MODES[mode][1] is None:  # no file: the body is at most max_body_bytes
        return await _submit(request, mode)
    idempotency.key_of(request)  # what is refused without the body is refused without waiting
    settings = request.app[SETTINGS]
    check_upload_headers(request, json_upload_limit(settings), settings.max_upload_bytes)
    async with upload_slot(request):
        return await _submit(request, mode)


def check_upload_headers(request: web.Request, json_limit: int, file_limit: int) -> None:
    """The checks of a body that may carry a file that need no byte of it, made before it waits
    for an upload slot: a request that cannot succeed is not told to retry later."""
    if request.content_type == "multipart/form-data":
        check_multipart_headers(request, file_limit)
    else:
        check_json_headers(request, json_limit, or_multipart=True)


def json_upload_limit(settings: Any) -> int:
    """A JSON body with a base64 file: 4/3 of the file, and room for the other fields."""
    return settings.max_upload_bytes * 4 // 3 + 65536


async def _submit(request: web.Request, mode: GenerationMode) -> web.Response:
    settings = request.app[SETTINGS]
    key = idempotency.key_of(request)
    request_model, file_field = MODES[mode]
    data: bytes | None = None
    form = file_field is not None and request.content_type == "multipart/form-data"
    if form:
        fields, data = await read_multipart(request, file_field, settings.max_upload_bytes)
        payload: dict[str, Any] = dict(fields)
    else:
        limit = settings.max_body_bytes if file_field is None else json_upload_limit(settings)
        payload = await read_json(request, limit, or_multipart=file_field is not None)
    req = _validate(request_model, payload, strict=not form)
    del payload  # the base64 text of a file, once more
    if file_field is not None and data is None:
        encoded = getattr(req, file_field)
        if encoded is None:
            raise bad_input(
                file_field,
                "missing",
                f"{file_field}: required for {mode} (a multipart file part named {file_field!r}, or base64 in JSON)",
            )
        data = await _decode_base64(file_field, encoded)
        del encoded
        req = req.model_copy(update={file_field: None})  # decoded: the text is not needed again
        if len(data) > settings.max_upload_bytes:
            raise _upload_too_large(file_field, settings.max_upload_bytes)

    if key is None:
        return _accepted_response(await accept(request, mode, req, data, file_field))
    return await run_to_end(request, _submit_once(request, mode, req, data, file_field, key))


async def _submit_once(
    request: web.Request, mode: GenerationMode, req: Any, data: bytes | None, file_field: str | None, key: str
) -> web.Response:
    """A submission with an Idempotency-Key: the job it made before, or a new one remembered under it."""
    if data is not None and len(data) > BASE64_PIECE:  # hashing a large file releases the GIL: off the loop
        print_ = await asyncio.to_thread(idempotency.fingerprint, mode, req, data)
    else:
        print_ = idempotency.fingerprint(mode, req, data)
    # One submission per key at a time, across gateways: a second concurrent first use waits,
    # then finds the job the first one made.
    async with idempotency.claim(request, key):
        job_id, etag = await store_call(idempotency.earlier_job(request, key, print_))
        if job_id is not None:
            return await _replay(request, job_id)
        request[ANNOUNCE_LATER] = True
        accepted = await accept(request, mode, req, data, file_field)
        try:
            # A store error is tried again for a few seconds: forgotten, the key would let a
            # retry of this request make a second job.
            await patiently(
                lambda: idempotency.remember(request, key, print_, accepted.job_id, etag),
                REMEMBER_PATIENCE_S,
                "remember_idempotency_key",
            )
            await _announce_queued(request)
        except idempotency.KeyTaken:
            # Another gateway made a job for this key meanwhile (this one's hold on the key was
            # lost): that job stands, and this duplicate is cancelled before it runs.
            log.warning("idempotency_key_raced", job_id=accepted.job_id)
            await _drop_duplicate(request, accepted.job_id)
            job_id, _ = await store_call(idempotency.earlier_job(request, key, print_))
            if job_id is None:  # the key's object is unreadable or gone again: let the client retry
                raise idempotency.busy() from None
            return await _replay(request, job_id)
        except Exception as exc:  # the job is queued; only a retry with this key would not find it
            log.warning("idempotency_key_not_saved", job_id=accepted.job_id, error=str(exc))
            await _announce_queued(request)
    return _accepted_response(accepted)


async def _announce_queued(request: web.Request) -> None:
    record = request[QUEUED_RECORD]
    if record.seq == 0:  # not if a worker has the job already (a publish whose confirm was lost)
        await announce(request, record)


async def _drop_duplicate(request: web.Request, job_id: str) -> None:
    """Cancel a job that this submission queued although another one with the same
    Idempotency-Key made the key's job: the record first (a worker that receives the job then
    drops it; without its webhook, since the client never saw this job), then, best effort, the
    cancel to the workers, which stops it should a worker have started it."""
    from gateway.jobs import cancelled_if_queued  # gateway.jobs imports this module

    def drop(now: JobRecord) -> JobRecord | None:
        return cancelled_if_queued(
            now, "cancelled: another submission with its Idempotency-Key made the job", webhook=None
        )

    try:
        now, cancelled = await request.app[STORE].update_record(job_id, drop)
        if cancelled and now is not None:
            await announce(request, now)
    except Exception as exc:
        log.error("duplicate_not_cancelled", job_id=job_id, error=str(exc))
    try:
        await request.app[BROKER].publish_cancel(job_id)
    except Exception as exc:
        log.warning("cancel_not_sent", job_id=job_id, error=str(exc))


async def accept(
    request: web.Request, mode: GenerationMode, req: Any, data: bytes | None, file_field: str | None
) -> JobAccepted:
    """Resolve the request against its model, check webhook and input, queue the job."""
    settings = request.app[SETTINGS]
    params, problems = request.app[REGISTRY].resolve(req, mode)
    if problems:
        raise ApiError(
            422, "validation_error", "; ".join(p.message for p in problems), [p.model_dump() for p in problems]
        )
    assert params is not None
    webhook = await _check_webhook(req, settings)
    checked = None if data is None else await asyncio.to_thread(_check_input, file_field, data, params, settings)
    return await enqueue(
        request, mode, params, [checked] if checked else [], webhook, _preflight(request, mode, params)
    )


def _preflight(request: web.Request, mode: GenerationMode, params: GenerationParams) -> Estimate | None:
    """Peak memory and seconds, and the plan that fits the workers' GPUs; 422 when nothing fits."""
    spec = request.app[REGISTRY].models[params.model]
    if spec.cost is None:
        return None
    try:
        return estimate_job(spec, mode, params, request.app[SETTINGS].gpu_memory_gib)
    except DoesNotFit as exc:
        message = f"{params.width}x{params.height}x{params.num_frames} {exc}"
        raise ApiError(
            422,
            "validation_error",
            message,
            [problem(f, "fits_gpu_memory", message) for f in ("width", "height", "num_frames")],
        ) from exc


def _accepted_response(accepted: JobAccepted, replayed: bool = False) -> web.Response:
    headers = {"Location": accepted.links["self"]}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return web.json_response(accepted.model_dump(mode="json"), status=202, headers=headers)


async def _replay(request: web.Request, job_id: str) -> web.Response:
    """The original job's 202, with its current status (queue figures are not read again)."""
    record = await store_call(request.app[STORE].get_record(job_id))
    if record is None or record.deleted_at is not None:
        raise ApiError(409, "idempotency_conflict", f"the job {job_id} this key created is gone")
    return _accepted_response(_accepted(record, None), replayed=True)


def _accepted(record: JobRecord, stats: Any) -> JobAccepted:
    return JobAccepted(
        job_id=record.job_id,
        status=record.status,
        model=record.model,
        mode=record.mode,
        request=record.params,
        workers=None if stats is None else stats.consumers,
        queue_depth=None if stats is None else stats.messages + 1,
        queue_position=record.queue_position,
        estimate=record.estimate,
        links={"self": f"/api/v1/jobs/{record.job_id}", "events": f"/api/v1/ws?job_id={record.job_id}"},
    )


async def _check_webhook(req: TextToVideoRequest, settings: Any) -> Webhook | None:
    if req.webhook_url is None:
        if req.webhook_events is not None:
            raise bad_field("webhook_events", "requires", "webhook_events: needs webhook_url")
        return None
    if settings.webhook_secret is None:
        raise bad_field(
            "webhook_url",
            "webhooks_disabled",
            "webhook_url: this server does not send webhooks (no VIDEOGEN_WEBHOOK_SECRET is configured)",
        )
    url = str(req.webhook_url)
    problem = await destination_problem(url, settings.webhook_allow_hosts)
    if problem is not None:
        raise bad_field("webhook_url", "destination", f"webhook_url: {problem}")
    return Webhook(url=url, events=list(req.webhook_events or DEFAULT_WEBHOOK_EVENTS))


def _validate(model: type[BaseModel], payload: dict[str, Any], strict: bool = True) -> Any:
    """Check a body against its model. A JSON body is checked strictly: an integer field takes a
    JSON integer, not "32", true or 32.0, and a number field no string. Form fields arrive as text
    (strict=False): a number field's text is read as a plain decimal number (`_form_numbers`), and
    the result is checked as strictly."""
    try:
        if not strict:
            payload = _form_numbers(model, payload)
        return model.model_validate(payload, strict=True)
    except ValidationError as exc:
        raise validation_error(exc) from exc


_ASCII_INT = re.compile(r"-?[0-9]+")
_ASCII_NUMBER = re.compile(r"-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?")


def ascii_int(text: str) -> int:
    """An integer written in ASCII digits, nothing else ("+5", " 5", "0_5", "٥" and "5.0" are not)."""
    if not _ASCII_INT.fullmatch(text):
        raise ValueError(f"not an integer: {text!r}")
    return int(text)


def _form_numbers(model: type[BaseModel], fields: dict[str, Any]) -> dict[str, Any]:
    """Form fields as the model's types: the text of an integer field becomes an int if it is one
    (`ascii_int`), of a number field a finite float; any other text stays text, which the strict
    check then refuses as no integer or number."""
    typed = dict(fields)
    for name, value in fields.items():
        field = model.model_fields.get(name)
        if field is None or not isinstance(value, str):
            continue
        kinds = set(typing.get_args(field.annotation)) or {field.annotation}
        with contextlib.suppress(ValueError):  # not such a number (or past Python's digit limit): stays text
            if int in kinds:
                typed[name] = ascii_int(value)
            elif float in kinds and _ASCII_NUMBER.fullmatch(value):
                typed[name] = _finite(value)
    return typed


def _check_input(field: str | None, data: bytes, params: GenerationParams, settings: Any) -> CheckedInput:
    if not data:  # an empty file part, or a data URL with nothing after its comma: no file to read
        raise bad_input(str(field), "empty", f"{field}: the file is empty (0 bytes)")
    if field == "image":
        return check_image(data, settings.max_image_pixels)
    return check_video(
        data, params.num_frames, settings.max_video_frames, settings.max_video_seconds, settings.max_video_side
    )


async def download_model(request: web.Request) -> web.Response:
    require_admin(request)
    req = _validate(DownloadRequest, await read_json(request, request.app[SETTINGS].max_body_bytes))
    spec = request.app[REGISTRY].get(req.model)
    if spec is None:
        raise bad_field("model", "known_model", request.app[REGISTRY].unknown(req.model))
    params = DownloadParams(model=spec.id, repo=spec.repo, revision=spec.revision)
    return _accepted_response(await enqueue(request, "download", params, []))


async def enqueue(
    request: web.Request,
    mode: Mode,
    params: GenerationParams | DownloadParams,
    inputs: list[CheckedInput],
    webhook: Webhook | None = None,
    preflight: Estimate | None = None,
) -> JobAccepted:
    """Store inputs, index entry and record, publish the job (confirmed), announce it, answer 202."""

    async def in_a_slot() -> JobAccepted:
        async with quota.slot(request, mode):
            return await _enqueue(request, mode, params, inputs, webhook, owner_of(request), preflight)

    return await run_to_end(request, in_a_slot())


async def run_to_end(request: web.Request, work: Coroutine[Any, Any, T]) -> T:
    """Run a submission to its end even if the request is cancelled (the client went away, the
    request timed out, the gateway is stopping): stopped half way, a job could be left stored as
    queued but never published, holding its key's quota slot, or published but not remembered
    under its Idempotency-Key. The gateway waits for these before it closes its connections."""
    task = asyncio.ensure_future(work)
    running = request.app[SUBMISSIONS]
    running.add(task)
    task.add_done_callback(_forget_submission(running))
    return await asyncio.shield(task)


def _forget_submission(running: set[asyncio.Future[Any]]) -> Callable[[asyncio.Future[Any]], None]:
    def done(task: asyncio.Future[Any]) -> None:
        running.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: an error nobody awaited is not logged as unretrieved

    return done


async def _enqueue(
    request: web.Request,
    mode: Mode,
    params: GenerationParams | DownloadParams,
    inputs: list[CheckedInput],
    webhook: Webhook | None,
    owner: str | None,
    preflight: Estimate | None,
) -> JobAccepted:
    app = request.app
    store, broker = app[STORE], app[BROKER]
    job_id = str(uuid.uuid4())
    now = utcnow()
    message = JobMessage(
        job_id=job_id,
        mode=mode,
        params=params,
        inputs={item.name: input_key(job_id, item.name, item.ext) for item in inputs},
    )
    # Jobs ahead of this one, read just before it joins the queue (figures up to 0.1 s old, which
    # err high: a queue looks full only if a fresh read says so too).
    stats = await _stats_or_none(broker, message)
    spec = app[REGISTRY].get(params.model)
    full = mode != "download" and _queue_full(stats, spec.max_queue_depth, params.model) is not None
    if full:
        stats = await _stats_or_none(broker, message, fresh=True)
    if full and (why := _queue_full(stats, spec.max_queue_depth, params.model)) is not None:
        # Refuse now rather than accept work that would wait for hours (or expire).
        assert stats is not None
        log.warning(
            "queue_full", model=params.model, waiting=stats.messages, ended=stats.ended, limit=spec.max_queue_depth
        )
        raise ApiError(
            503,
            "queue_full",
            f"{why}; retry later",
            headers={"Retry-After": str(_retry_after(stats))},
        )
    record = JobRecord(
        job_id=job_id,
        mode=mode,
        model=params.model,
        status=JobStatus.QUEUED,
        phase=Phase.QUEUED,
        progress=0.0,
        seq=0,
        created_at=now,
        updated_at=now,
        params=params,
        inputs=message.inputs,
        queue_position=None if stats is None else stats.ahead_of(_priority(params)),
        webhook=webhook,
        owner=owner,
        estimate=preflight,
    )
    record.events = [record.last_event()]
    # Inputs, index entry and record are stored (all at once) before the job is published, so a
    # worker always finds them; listings skip index entries without a record. The record is
    # written once the job's expiry check is confirmed: a record that a gateway dying before the
    # publish leaves `queued` then still ends when the check falls due. The quota marker is
    # written after the record (a marker without a record is then always a leftover, which
    # gateway/quota.py sweeps), at the same time as the job is published.
    writes = [store.put_bytes(message.inputs[item.name], item.data, item.content_type) for item in inputs]
    writes.append(store.put_bytes(index_key(job_id, params.model, now, owner), b"", "application/octet-stream"))
    checked_then_stored = _check_then_store(app, message, record, _max_queue_s(app, params, mode))
    # Each settles before any error is looked at.
    *results, stored = await asyncio.gather(*writes, checked_then_stored, return_exceptions=True)
    unchecked = stored if isinstance(stored, _NotChecked) else None
    if failed := [r for r in [*results, stored] if isinstance(r, BaseException) and r is not unchecked]:
        log.error("store_write_failed", job_id=job_id, error=str(failed[0]))
        # The record says queued (written, or its write unanswered and perhaps stored): it must not.
        if not isinstance(stored, _NotChecked):
            await _mark_unpublished(request, record, "the object store failed while the job was being queued")
        raise store_unavailable() from failed[0]
    published: BaseException | None = None if unchecked is None else unchecked.__cause__
    held = None
    if published is None:
        held, published = await asyncio.gather(
            quota.hold(request, mode, job_id), broker.publish_job(message), return_exceptions=True
        )
    if isinstance(published, BaseException):
        log.error("publish_failed", job_id=job_id, error=str(published))
        taken = await _mark_unpublished(request, record)
        if taken is None:
            raise ApiError(
                503, "broker_unavailable", "the job could not be queued; retry later", headers={"Retry-After": "5"}
            ) from published
        # The broker took the job after all (only its confirm was lost): a worker has it, and
        # has announced it.
        log.warning("publish_confirm_lost", job_id=job_id)
        record = taken
    if isinstance(held, BaseException):  # the job is queued: it only goes uncounted by other gateways
        log.warning("quota_marker_not_saved", job_id=job_id, error=str(held))
    if record.seq == 0 and not request.get(ANNOUNCE_LATER):
        await announce(request, record)
    SUBMITTED.labels(params.model, mode, _priority(params)).inc()
    workers = None if stats is None else stats.consumers
    log.info("job_accepted", job_id=job_id, model=params.model, mode=mode, workers=workers)
    request[QUEUED_RECORD] = record
    return _accepted(record, stats)


class _NotChecked(Exception):
    """The job's expiry check was not published (its cause says why), so its record was not written."""


async def _check_then_store(app: web.Application, message: JobMessage, record: JobRecord, max_queue_s: int) -> None:
    try:
        await app[BROKER].publish_expiry_check(message, max_queue_s)
    except Exception as exc:
        raise _NotChecked() from exc
    await app[STORE].put_record(record)


def _max_queue_s(app: web.Application, params: GenerationParams | DownloadParams, mode: Mode) -> int:
    if mode == "download":
        return int(app[SETTINGS].download_max_queue_s)
    return int(app[REGISTRY].models[params.model].max_queue_s)


def _priority(params: GenerationParams | DownloadParams) -> Priority:
    return params.priority if isinstance(params, GenerationParams) else "normal"


def _queue_full(stats: QueueStats | None, max_queue_depth: int, model: str) -> str | None:
    """Why a model's queues take no more jobs, or None. Messages of jobs that ended while queued
    (which wait there until a worker drops them) do not count towards `max_queue_depth`, but all
    messages together may be at most ENDED_ALLOWANCE times that: for a model that no worker
    serves nothing drops them."""
    if stats is None:
        return None
    if stats.messages >= max_queue_depth:
        return f"{stats.messages} jobs are waiting for model {model!r} (limit {max_queue_depth})"
    if stats.messages + stats.ended >= ENDED_ALLOWANCE * max_queue_depth:
        return (
            f"{stats.messages + stats.ended} messages are in the queues of model {model!r}, {stats.ended} of them "
            f"of jobs that ended before a worker took them, which no worker has dropped yet "
            f"(limit {ENDED_ALLOWANCE * max_queue_depth})"
        )
    return None


def _retry_after(stats: Any) -> int:
    """A rough wait: a few seconds per waiting job per worker, at least 5 s, at most 10 min."""
    return max(5, min(600, 5 * stats.messages // max(stats.consumers, 1)))


async def _stats_or_none(broker: Any, message: JobMessage, fresh: bool = False) -> Any:
    try:
        return await broker.queue_stats(message, fresh)
    except Exception as exc:  # only the counts are unknown; the job can still be queued
        log.warning("queue_stats_failed", job_id=message.job_id, error=str(exc))
        return None


async def announce(request: web.Request, record: JobRecord) -> None:
    """Publish a record's latest event; also straight into this gateway's hub, so its own clients
    see it before the broker's copy comes back (the copy is dropped by seq). An end is published
    confirmed, in the background, through a broker outage; the `queued` event best effort."""
    event = JobEvent.from_record(record)
    request.app[HUB].publish(event)
    if record.status.is_terminal:
        request.app[BROKER].publish_end_soon(event)
        return
    try:
        await request.app[BROKER].publish_event(event)
    except Exception as exc:  # the record already says it
        log.warning("event_publish_failed", job_id=record.job_id, error=str(exc))


async def _mark_unpublished(
    request: web.Request, record: JobRecord, reason: str = "the broker did not accept the job"
) -> JobRecord | None:
    """Move a job that was not queued on to `failed` (`not_queued`) and free its quota slot.
    If a worker has taken the job (the publish reached the broker and only its confirm was
    lost), change nothing and return the job as the worker has it."""
    error = JobError(code="not_queued", message=reason)

    def fail(now: JobRecord) -> JobRecord | None:
        # A publish whose confirm was lost may still have reached a worker: if one took the job,
        # it is the worker's (the write is conditional on the record still being queued).
        if now.status != JobStatus.QUEUED or now.attempts:
            return None
        return now.advance(status=JobStatus.FAILED, phase=Phase.FAILED, error=error)

    taken: JobRecord | None = None
    try:
        now, failed = await request.app[STORE].update_record(record.job_id, fail)
        taken = now if now is not None and not failed and now.attempts > 0 else None
        if taken is not None and not taken.status.is_terminal:
            return taken  # the job runs, and counts against its key until it ends
    except Exception as exc:
        log.error("store_write_failed", job_id=record.job_id, error=str(exc))
    try:  # on its own: a marker left behind would hold one of the key's slots for good
        await quota.release(request.app[STORE], record)
    except Exception as exc:
        log.error("quota_marker_not_released", job_id=record.job_id, error=str(exc))
    return taken


async def health(request: web.Request) -> web.Response:
    return web.json_response(Health(status="ok").model_dump())


async def ready(request: web.Request) -> web.Response:
    broker_ok = request.app[BROKER].connected
    store_ok = await request.app[STORE].ping()
    body = Readiness(
        status="ready" if broker_ok and store_ok else "unavailable",
        broker="ok" if broker_ok else "unreachable",
        store="ok" if store_ok else "unreachable",
    ).model_dump()
    return web.json_response(body, status=200 if broker_ok and store_ok else 503)
