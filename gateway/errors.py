"""Every error leaves the gateway as JSON: `{"error": {"code", "message", "details"?}}`, or, on the
OpenAI-compatible routes (`/v1/...`), in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web
from pydantic import ValidationError

from common.store import STORE_ERRORS, RecordChanged

log = structlog.get_logger("gateway")


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details, self.headers = status, code, message, details, headers

    def response(self) -> web.Response:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        return web.json_response({"error": body}, status=self.status, headers=self.headers)

    def openai_response(self) -> web.Response:
        """OpenAI's error shape; 422 is answered as 400, as OpenAI answers a bad field."""
        kind = {
            401: "authentication_error",
            403: "permission_error",
            429: "rate_limit_error",
        }.get(self.status, "invalid_request_error" if self.status < 500 else "api_error")
        param = self.details[0]["field"] if self.details else None
        body = {"error": {"message": self.message, "type": kind, "param": param, "code": self.code}}
        return web.json_response(body, status=400 if self.status == 422 else self.status, headers=self.headers)


# Set on a request that asked for "100 Continue" until the handler starts reading its body.
CONTINUE_PENDING = "continue_pending"


def respond(request: web.Request, exc: ApiError) -> web.Response:
    """The error in the shape the route's clients expect: OpenAI's on `/v1/...`, ours elsewhere."""
    response = exc.openai_response() if request.path == "/v1" or request.path.startswith("/v1/") else exc.response()
    # The rest of the body is left unread (413), or the client was never invited to send it and
    # may not: either way the connection cannot carry another request.
    if exc.status == 413 or request.get(CONTINUE_PENDING):
        response.force_close()
    return response


def store_unavailable() -> ApiError:
    return ApiError(
        503, "store_unavailable", "the object store is unavailable; retry later", headers={"Retry-After": "5"}
    )


async def store_call(operation: Awaitable[Any]) -> Any:
    """Await a store operation a request needs: the store being down is a 503, not a 500."""
    try:
        return await operation
    except ApiError:
        raise
    except Exception as exc:
        log.error("store_call_failed", error=str(exc))
        raise store_unavailable() from exc


def bad_field(field: str, rule: str, message: str) -> ApiError:
    """422 for one field, shaped like pydantic's validation errors."""
    return ApiError(422, "validation_error", message, [problem(field, rule, message)])


def problem(field: str, rule: str, message: str) -> dict[str, str]:
    """One entry of a 422's `details`."""
    return {"field": field, "rule": rule, "message": message}


# Most problems one answer names; a body with more gets these and their count (an answer does not
# grow past its request: a body of 60,000 unknown keys would make one of megabytes).
MAX_PROBLEMS = 20


def validation_error(exc: ValidationError) -> ApiError:
    details = []
    for err in exc.errors(include_url=False, include_input=False):
        field = ".".join(str(p) for p in err["loc"]) or "body"
        if len(field) > 80:  # a client's unknown key, however long, is named by its start
            field = f"{field[:80]}... ({len(field)} characters)"
        details.append(problem(field, err["type"], f"{field}: {err['msg']}"))
    return problems_error(details)


def problems_error(details: list[dict[str, Any]]) -> ApiError:
    """422 naming every problem (up to MAX_PROBLEMS, then how many more) in `details` and in the message."""
    more = len(details) - MAX_PROBLEMS
    details = details[:MAX_PROBLEMS]
    message = "; ".join(d["message"] for d in details) + (f"; and {more} more problems" if more > 0 else "")
    return ApiError(422, "validation_error", message, details)


_HTTP_CODES = {
    400: "bad_request",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
}


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return respond(request, exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "http_error")
        # A body too large, and a CORS preflight refused (aiohttp_cors says why), carry their own text.
        message = exc.text if exc.status in (403, 413) and exc.text else exc.reason
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        return respond(request, ApiError(exc.status, code, message, headers=headers))
    except RecordChanged as exc:  # a record others kept writing while this request changed it
        log.warning("record_contended", path=request.path, method=request.method, key=str(exc))
        return respond(
            request,
            ApiError(
                503,
                "record_busy",
                "the job's record kept changing while this request was updating it; retry",
                headers={"Retry-After": "1"},
            ),
        )
    except STORE_ERRORS as exc:  # wherever a request reads or writes the store
        log.error("store_call_failed", path=request.path, method=request.method, error=str(exc))
        return respond(request, store_unavailable())
    except Exception:
        log.exception("unhandled_error", path=request.path, method=request.method)
        return respond(request, ApiError(500, "internal_error", "internal error; see the gateway log"))


# Streams stay open for as long as the client listens; every other request has a deadline.
STREAMING_PATHS = frozenset({"/api/v1/ws", "/api/v1/events"})


def timeout_middleware(seconds: float) -> Callable[..., Awaitable[web.StreamResponse]]:
    """504 with a JSON body when a request takes longer than `seconds` (streams excepted)."""

    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path in STREAMING_PATHS:
            return await handler(request)
        try:
            async with asyncio.timeout(seconds):
                return await handler(request)
        except TimeoutError:
            log.warning("request_timeout", path=request.path, method=request.method, seconds=seconds)
            return respond(request, ApiError(504, "timeout", f"the request took longer than {seconds:g} s"))

    return middleware


QUERY_NAMES = "query_names"  # the attribute `reads_query` sets on a handler
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def reads_query(*names: str, repeatable: tuple[str, ...] = ()) -> Callable[[Handler], Handler]:
    """Declares the query parameters a route's handler reads: `query_values` checks those (each
    given once, except the `repeatable` ones, and UTF-8) and no others, which the route ignores."""

    def mark(handler: Handler) -> Handler:
        setattr(handler, QUERY_NAMES, (frozenset(names), frozenset(repeatable)))
        return handler

    return mark


def _not_utf8(raw_query: str, read: frozenset[str]) -> str | None:
    """The first query parameter in `read` whose value, percent-decoded, is not UTF-8 (which the
    request's parsed query would carry with U+FFFD in place of the bytes)."""
    for pair in raw_query.split("&"):
        name, _, value = pair.partition("=")
        try:
            name = urllib.parse.unquote_to_bytes(name.replace("+", " ")).decode()
        except UnicodeDecodeError:
            continue  # not a name the route reads
        if name in read:
            try:
                urllib.parse.unquote_to_bytes(value.replace("+", " ")).decode()
            except UnicodeDecodeError:
                return name
    return None


@web.middleware
async def query_values(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A query parameter the route reads given twice is refused rather than one of its values
    picked silently, and one that is not UTF-8 rather than read with its bytes replaced. Routes
    that read none (health, metrics, submissions...) ignore the query string."""
    single, repeatable = getattr(request.match_info.handler, QUERY_NAMES, (frozenset(), frozenset()))
    for name in sorted(single.intersection(request.query)):
        if len(request.query.getall(name)) > 1:
            raise bad_field(name, "single_value", f"{name}: given more than once; give each query parameter once")
    read = single | repeatable
    if read and "%" in request.rel_url.raw_query_string and (name := _not_utf8(request.rel_url.raw_query_string, read)):
        raise bad_field(name, "utf8", f"{name}: not UTF-8 once percent-decoded")
    return await handler(request)
