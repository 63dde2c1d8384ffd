"""Errors raised by the client. Every one is a `VideogenError`."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


class VideogenError(Exception):
    """Base class of every error the client raises.

    `status` is the HTTP status of the answer (None when there was none), `code` the stable error
    code (the gateway's `error.code`, or one of the client's own: `unreachable`, `network_error`,
    `download_failed`, `no_video`, `wait_timeout`), `message` a sentence for people and `details`
    the gateway's list of `{"field", "rule", "message"}` entries (empty when it sent none).
    """

    default_code = "error"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        details: list[dict[str, Any]] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code or self.default_code
        self.details = list(details or [])
        self.retry_after = retry_after

    def __str__(self) -> str:
        prefix = f"{self.status} {self.code}" if self.status is not None else self.code
        return f"{prefix}: {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status!r}, code={self.code!r}, message={self.message!r})"

    def describe(self) -> str:
        """The error on one line, then one indented line per detail (`field (rule): message`)."""
        lines = [str(self)]
        for detail in self.details:
            field, rule = detail.get("field"), detail.get("rule")
            where = " ".join(part for part in (str(field) if field else "", f"({rule})" if rule else "") if part)
            text = detail.get("message") or ""
            lines.append(f"  - {where}: {text}" if where else f"  - {text}")
        return "\n".join(lines)


class APIError(VideogenError):
    """The gateway answered with an error (`{"error": {"code", "message", "details"?}}`)."""


class BadRequestError(APIError):
    """400: a malformed request (bad JSON, bad stream parameters, ...)."""


class AuthenticationError(APIError):
    """401: no API key, or one the gateway does not know."""


class PermissionDeniedError(APIError):
    """403: the API key may not do this (model downloads need an admin key)."""


class NotFoundError(APIError):
    """404: no such job (or another API key's), model or path."""


class ConflictError(APIError):
    """409: the job has already ended, cannot be cancelled now, or an Idempotency-Key clash."""


class PayloadTooLargeError(APIError):
    """413: the body or the uploaded file is larger than the gateway accepts."""


class ValidationError(APIError):
    """422: the request breaks a rule (`validation_error`) or the uploaded file fails a check (`invalid_input`).

    `details` lists each problem's `field`, `rule` and `message`."""


class RateLimitError(APIError):
    """429: too many requests (`rate_limited`) or too many jobs queued or running (`quota_exceeded`).

    `retry_after` is the gateway's `Retry-After`, in seconds."""


class ServerError(APIError):
    """5xx: the gateway could not do it now (see `code`)."""


class ServiceUnavailableError(ServerError):
    """503: `queue_full`, `uploads_busy`, `store_unavailable` or `broker_unavailable`; retry after `retry_after` seconds."""


class GatewayUnreachableError(VideogenError):
    """No connection to the gateway could be made (refused, unknown host, ...)."""

    default_code = "unreachable"


class NetworkError(VideogenError):
    """The connection to the gateway failed or timed out after it was made."""

    default_code = "network_error"


class DownloadError(VideogenError):
    """The video could not be fetched from the object store through its presigned link."""

    default_code = "download_failed"


class JobNotSucceededError(VideogenError):
    """A video was asked for a job that has not succeeded. `job` is the job as last read."""

    default_code = "no_video"

    def __init__(self, message: str, *, job: Mapping[str, Any]) -> None:
        super().__init__(message)
        self.job = dict(job)


class WaitTimeoutError(VideogenError, TimeoutError):
    """`wait` gave up before the job ended. `job_id` names the job, which goes on running."""

    default_code = "wait_timeout"

    def __init__(self, message: str, *, job_id: str) -> None:
        super().__init__(message)
        self.job_id = job_id


_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: ValidationError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}


def api_error(
    status: int,
    code: str,
    message: str,
    details: list[dict[str, Any]] | None = None,
    retry_after: float | None = None,
) -> APIError:
    """The `APIError` subclass for an HTTP status."""
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else APIError)
    return cls(message, status=status, code=code, details=details, retry_after=retry_after)


def error_from_response(status: int, body: bytes, headers: Mapping[str, str] | None = None) -> APIError:
    """The error for a gateway answer with an error status, filled from its JSON body when it has one."""
    code, message, details = f"http_{status}", "", []
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        code = str(error.get("code") or code)
        message = str(error.get("message") or "")
        details = [d for d in error.get("details") or [] if isinstance(d, dict)]
    if not message:
        text = body.decode("utf-8", "replace").strip()
        message = text[:500] if text else f"HTTP {status} with an empty body"
    retry_after = None
    if headers is not None and headers.get("Retry-After"):
        try:
            retry_after = float(headers["Retry-After"])
        except ValueError:
            retry_after = None
    return api_error(status, code, message, details, retry_after)
