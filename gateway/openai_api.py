"""OpenAI-compatible Videos API: `/v1/videos`, for clients written against OpenAI's.

A video is one of our jobs seen through OpenAI's video object. `size` ("WIDTHxHEIGHT") and
`seconds` map onto the model's width, height and frames (`seconds * fps + 1`, rounded to the
model's frame rule); `input_reference` (an image file) makes it an image-to-video job. Errors
use OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`. The API key is the same
bearer token as for `/api/v1`.
"""

from __future__ import annotations

import asyncio
import math
from decimal import Decimal
from fractions import Fraction
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from common.store import index_key, index_prefix, job_id_of_index, output_key
from gateway.auth import owner_of, visible
from gateway.errors import ApiError, bad_field, problem, problems_error, reads_query, store_call, validation_error
from gateway.handlers import (
    QUEUED_RECORD,
    accept,
    ascii_int,
    check_upload_headers,
    expect_continue_later,
    parse_job_id,
    read_json,
    read_multipart,
    upload_slot,
)
from gateway.jobs import cancel, load_video, video_redirect
from gateway.keys import REGISTRY, SETTINGS, STORE
from schemas.jobs import JobRecord, JobStatus, utcnow
from schemas.requests import ImageToVideoRequest, TextToVideoRequest, check_prompt_text, refuse_controls

LIST_LIMIT_MAX = 100
# How many index entries `order=asc` reads at most: the index lists newest first, so a listing
# oldest first reads it from the newest entry to the oldest (or to `after`'s entry).
ASC_SCAN_MAX = 100_000
# Most index entries one page newest first reads (skipping downloads and entries without a record).
PAGE_SCAN_MAX = 10_000
# Index entries a newest-first listing reads per store LIST.
LIST_BATCH = 100

STATUS = {
    JobStatus.QUEUED: "queued",
    JobStatus.RUNNING: "in_progress",
    JobStatus.SUCCEEDED: "completed",
    JobStatus.FAILED: "failed",
    JobStatus.CANCELLED: "failed",
}


class CreateVideo(BaseModel):
    """`POST /v1/videos` (JSON, or multipart with an `input_reference` file)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    prompt: str = Field(min_length=1, max_length=4000)
    model: str | None = Field(default=None, min_length=1, max_length=100)
    seconds: str | None = Field(default=None, pattern=r"^[0-9]{1,3}(\.[0-9]+)?$", description='Duration, e.g. "4".')
    size: str | None = Field(default=None, pattern=r"^[1-9][0-9]{1,4}x[1-9][0-9]{1,4}$", description='"WIDTHxHEIGHT".')

    @field_validator("prompt", mode="before")
    @classmethod
    def _no_controls(cls, value: Any) -> Any:
        return refuse_controls(value)

    @field_validator("prompt")
    @classmethod
    def _prompt_text(cls, value: str) -> str:
        return check_prompt_text(value)


def video_object(request: web.Request, record: JobRecord) -> dict[str, Any]:
    params = record.params
    fps = getattr(params, "fps", None) or 1
    settings = request.app[SETTINGS]
    retention = settings.output_retention_days
    created = int(record.created_at.timestamp())
    error = None
    if record.status == JobStatus.CANCELLED:
        error = {"code": "cancelled", "message": record.message or "cancelled"}
    elif record.error is not None:
        error = {"code": record.error.code, "message": record.error.message}
    return {
        "id": record.job_id,
        "object": "video",
        "model": record.model,
        "status": STATUS[record.status],
        "progress": math.floor(record.progress * 100),
        "created_at": created,
        "completed_at": int(record.finished_at.timestamp()) if record.finished_at else None,
        "expires_at": created + retention * 86400 if retention else None,
        "prompt": getattr(params, "prompt", None),
        "size": f"{getattr(params, 'width', 0)}x{getattr(params, 'height', 0)}",
        # The inverse of the mapping in create_video: frames = seconds * fps + 1.
        "seconds": _seconds_text((getattr(params, "num_frames", 1) - 1) / fps),
        "remixed_from_video_id": None,
        "error": error,
    }


def frame_steps(seconds: str, fps: int, frame_step: int) -> int:
    """How many frame steps a duration makes: (seconds x fps - 1) / frame_step, rounded half up
    (as people round; round() goes to the even step), in exact arithmetic (the decimal string as
    a fraction: at 15 fps 8.2 s is 123 frames, where floats make 122.99999999999999)."""
    return math.floor((Fraction(seconds) * fps - 1 + Fraction(frame_step, 2)) / frame_step)


def _exact(value: Fraction) -> str:
    """A bound in seconds as it is: a decimal where it has one (0.625), else the fraction, with
    its value to four places (5/24, about 0.2083)."""
    decimal = Decimal(value.numerator) / Decimal(value.denominator)
    if Fraction(decimal) == value:
        return f"{decimal.normalize():f}"
    return f"{value.numerator}/{value.denominator} (about {float(value):.4g})"


def _seconds_text(seconds: float) -> str:
    return str(round(seconds)) if abs(seconds - round(seconds)) < 0.05 else f"{seconds:.2f}"


async def create_video(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    check_upload_headers(request, settings.max_body_bytes, settings.max_upload_bytes)
    async with upload_slot(request):  # an input_reference may come with it
        return await _create_video(request)


async def _create_video(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    data: bytes | None = None
    if request.content_type == "multipart/form-data":
        fields, data = await read_multipart(request, "input_reference", settings.max_upload_bytes)
        payload: dict[str, Any] = dict(fields)
    else:
        payload = await read_json(request, settings.max_body_bytes, or_multipart=True)
    try:
        create = CreateVideo.model_validate(payload)
    except ValidationError as exc:
        raise validation_error(exc) from exc  # every problem in the message; `param` names the first
    mode: Literal["text-to-video", "image-to-video"] = "text-to-video" if data is None else "image-to-video"
    registry = request.app[REGISTRY]
    spec = registry.get(create.model or registry.default_model)
    if spec is None:
        raise bad_field("model", "known_model", f"model: {registry.unknown(str(create.model))}")
    fields: dict[str, Any] = {"prompt": create.prompt, "model": spec.id}
    problems: list[dict[str, Any]] = []  # all of them, in one answer
    if create.size is not None:
        width, height = (int(v) for v in create.size.split("x"))
        fields |= {"width": width, "height": height}
    if create.seconds is not None:
        fps = spec.defaults.fps or spec.native_fps
        half_step = Fraction(spec.frame_step, 2)
        steps = frame_steps(create.seconds, fps, spec.frame_step)
        frames = steps * spec.frame_step + 1
        if steps < 1:  # seconds * fps - 1 under half a frame step: no step at all
            shortest, rounds_to_one = Fraction(spec.frame_step, fps), (half_step + 1) / fps
            message = (
                f"seconds: model {spec.id!r} makes videos of at least {_seconds_text(float(shortest))} s "
                f"({spec.frame_step + 1} frames at {fps} fps); less than {_exact(rounds_to_one)} s rounds to none"
            )
            problems.append(problem("seconds", "min_duration", message))
        elif frames > spec.limits.max_frames:
            longest = Fraction(spec.limits.max_frames - 1, fps)
            rounds_past = (spec.limits.max_frames - 1 + half_step + 1) / fps
            message = (
                f"seconds: model {spec.id!r} makes at most {_seconds_text(float(longest))} s ({spec.limits.max_frames} "
                f"frames at {fps} fps); {_exact(rounds_past)} s or more rounds to more"
            )
            problems.append(problem("seconds", "max_duration", message))
        else:
            fields["num_frames"] = frames
    try:
        req = (ImageToVideoRequest if data is not None else TextToVideoRequest).model_validate(fields)
    except ValidationError as exc:
        problems += [problem("size", err["type"], f"size: {err['msg']}") for err in exc.errors(include_url=False)]
    else:
        if problems:  # the model's own rules for the rest (its sizes), else checked on acceptance
            problems += [p.model_dump() for p in registry.resolve(req, mode)[1]]
    if problems:
        raise _in_openai_terms(problems_error(problems))
    try:
        await accept(request, mode, req, data, "image" if data is not None else None)
    except ApiError as exc:
        raise _in_openai_terms(exc) from exc
    return web.json_response(video_object(request, request[QUEUED_RECORD]))


def _in_openai_terms(exc: ApiError) -> ApiError:
    """Name OpenAI's fields in errors about ours: width/height → size, num_frames → seconds, image → input_reference."""
    names = {"width": "size", "height": "size", "num_frames": "seconds", "image": "input_reference"}
    if exc.details:
        joined = "; ".join(d["message"] for d in exc.details)
        more = exc.message[len(joined) :] if exc.message.startswith(joined) else ""  # "; and N more problems"
        exc.details = _merged([_renamed(d, names.get(d["field"])) for d in exc.details])
        exc.message = "; ".join(d["message"] for d in exc.details) + more
    return exc


def _merged(details: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One detail per problem: ours may name one problem for several fields (a job too large for
    the GPUs names width, height and num_frames), which OpenAI's names fold into fewer (size,
    seconds). The first detail of each problem stays, its message naming every field once."""
    problems: dict[str, list[dict[str, Any]]] = {}
    for detail in details:
        text = detail["message"].removeprefix(f"{detail['field']}:").lstrip()
        problems.setdefault(text, []).append(detail)
    merged = []
    for text, same in problems.items():
        fields = list(dict.fromkeys(d["field"] for d in same))
        merged.append(same[0] if len(fields) == 1 else same[0] | {"message": f"{', '.join(fields)}: {text}"})
    return merged


def _renamed(detail: dict[str, Any], name: str | None) -> dict[str, Any]:
    """The detail about one of our fields as one about OpenAI's `name`: "image: ..." becomes
    "input_reference: ...", and "width must be ..." "size: width must be ..."."""
    if name is None:
        return detail
    field, message = detail["field"], detail["message"]
    text = message.removeprefix(f"{field}:").lstrip() if message.startswith(f"{field}:") else message
    return detail | {"field": name, "message": f"{name}: {text}"}


async def get_video(request: web.Request) -> web.Response:
    return web.json_response(video_object(request, await _load_video(request)))


async def _load_video(request: web.Request) -> JobRecord:
    return await load_video(request, request.match_info["video_id"])


async def delete_video(request: web.Request) -> web.Response:
    """An ended job is deleted with its video, and so is a queued one, cancelled first; a running
    one is cancelled, and `deleted` is false: it stops at its next stopping point, and a delete
    once it has ended removes it."""
    record = await _load_video(request)
    if not record.status.is_terminal:
        record, _ = await cancel(request, record)
    if record.status.is_terminal:
        await _delete_ended(request, record)
    return web.json_response({"id": record.job_id, "object": "video.deleted", "deleted": record.status.is_terminal})


async def _delete_ended(request: web.Request, record: JobRecord) -> None:
    # The record stays, marked deleted (a tombstone): a message of the job still in a queue
    # (it was cancelled or expired before it started) then finds an ended job and is dropped.
    store = request.app[STORE]
    await store_call(store.put_record(record.model_copy(update={"deleted_at": utcnow(), "output": None})))
    # Every attempt's video key: a run that died after its upload left its video behind.
    videos = {output_key(record.job_id, n) for n in range(1, max(record.attempts, 1) + 1)}
    keys = [
        *videos,
        *([record.output.key] if record.output else []),
        *record.inputs.values(),
        index_key(record.job_id, record.model, record.created_at, record.owner),
    ]
    await store_call(asyncio.gather(*(store.delete(key) for key in keys)))


@reads_query("variant")
async def video_content(request: web.Request) -> web.Response:
    record = await _load_video(request)
    variant = request.query.get("variant", "video")
    if variant != "video":
        raise bad_field("variant", "supported", f"variant: only 'video' is available, not {variant!r}")
    raise video_redirect(request, record, f"video {record.job_id} has no content ({STATUS[record.status]})")


@reads_query("limit", "order", "after")
async def list_videos(request: web.Request) -> web.Response:
    query = request.query
    try:
        limit = ascii_int(query.get("limit", "20"))
        if not 1 <= limit <= LIST_LIMIT_MAX:
            raise ValueError
    except ValueError as exc:
        raise bad_field("limit", "range", f"limit: an integer from 1 to {LIST_LIMIT_MAX}") from exc
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise bad_field("order", "enum", "order: asc or desc")
    after = query.get("after")
    truncated = False
    if order == "desc":
        data, truncated = await _newest_first(request, limit, after)
    else:
        data = await _oldest_first(request, limit, after)
    more = len(data) > limit or truncated
    data = data[:limit]
    return web.json_response(
        {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": more,
        }
    )


async def _newest_first(request: web.Request, limit: int, after: str | None) -> tuple[list[dict[str, Any]], bool]:
    """A page of the key's videos, newest first, and one more if there is one: the index is listed
    from just after `after`'s entry (named by its time, id and model, which its record holds), so
    every video of the key can be reached, a page at a time. Also whether the page stopped at
    PAGE_SCAN_MAX entries with more to read (then it has more, though it may hold fewer videos).
    A page that has found no video by then reads on until it finds one or the index ends: the
    next page must have a video of this one to go on after."""
    store, owner = request.app[STORE], owner_of(request)
    start = await _after_entry(request, after)
    data: list[dict[str, Any]] = []
    scanned = 0
    # Entries are read a batch at a time; entries that are no video of the caller (downloads,
    # entries without a record) are skipped, up to PAGE_SCAN_MAX entries per page.
    while len(data) <= limit and (scanned < PAGE_SCAN_MAX or not data):
        keys = await store.list_keys(index_prefix(owner), start, LIST_BATCH)
        if not keys:
            break
        while keys and len(data) <= limit:  # records read only as far as the page needs them
            chunk, keys = keys[: limit + 1 - len(data)], keys[limit + 1 - len(data) :]
            await _add_videos(request, [job_id_of_index(k) for k in chunk], data, limit + 1)
            start, scanned = chunk[-1], scanned + len(chunk)
    truncated = (
        len(data) <= limit and scanned >= PAGE_SCAN_MAX and bool(await store.list_keys(index_prefix(owner), start, 1))
    )
    return data, truncated


async def _oldest_first(request: web.Request, limit: int, after: str | None) -> list[dict[str, Any]]:
    """A page oldest first, and one more if there is one: the index, which lists newest first, is
    read from its start to `after`'s entry (named by its time, id and model, which its record
    holds; a deleted `after` too), or to its end, at most ASC_SCAN_MAX entries, and taken backwards."""
    store, owner = request.app[STORE], owner_of(request)
    stop = await _after_entry(request, after)
    keys = await store.list_keys(index_prefix(owner), None, ASC_SCAN_MAX, before=stop)
    ids = [job_id_of_index(k) for k in reversed(keys)]
    data: list[dict[str, Any]] = []
    # Records are read a batch at a time, at once, until the page (and one more, for has_more) is full.
    for begin in range(0, len(ids), limit + 1):
        await _add_videos(request, ids[begin : begin + limit + 1], data, limit + 1)
        if len(data) > limit:
            break
    return data


async def _after_entry(request: web.Request, after: str | None) -> str | None:
    """The index entry of the video a page starts after, found through its record: one of the
    caller's, deleted ones included (a client that deletes each video of a page goes on after the
    last one it deleted). Named as in the listing's own prefix (that of the caller's key;
    index/jobs/ without auth). None without `after`."""
    if after is None:
        return None
    owner = owner_of(request)
    try:
        record = await request.app[STORE].get_record(parse_job_id(after))
    except ApiError:  # not a job id at all
        record = None
    if record is None or record.mode == "download" or (owner is not None and record.owner != owner):
        raise bad_field("after", "known_video", f"after: no video {after!r}")
    return index_key(record.job_id, record.model, record.created_at, owner)


async def _add_videos(request: web.Request, ids: list[str], data: list[dict[str, Any]], most: int) -> None:
    """Read these jobs' records at once and add the caller's videos among them, in order, up to `most`."""
    store, owner = request.app[STORE], owner_of(request)
    for record in await asyncio.gather(*(store.get_record(job_id) for job_id in ids)):
        if len(data) < most and record is not None and visible(record, owner) and record.mode != "download":
            data.append(video_object(request, record))


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/videos", create_video, expect_handler=expect_continue_later)
    app.router.add_get("/v1/videos", list_videos)
    app.router.add_get("/v1/videos/{video_id}", get_video)
    app.router.add_delete("/v1/videos/{video_id}", delete_video)
    app.router.add_get("/v1/videos/{video_id}/content", video_content)
