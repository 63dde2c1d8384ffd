"""Python client of the videogen gateway: `AsyncClient` (aiohttp), `Client` (blocking) and the `videogen` command."""

from videogen_client.client import DEFAULT_URL, TERMINAL_STATUSES, AsyncClient, Client, job_id_of
from videogen_client.errors import (
    APIError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    DownloadError,
    GatewayUnreachableError,
    JobNotSucceededError,
    NetworkError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    ServiceUnavailableError,
    ValidationError,
    VideogenError,
    WaitTimeoutError,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_URL",
    "TERMINAL_STATUSES",
    "APIError",
    "AsyncClient",
    "AuthenticationError",
    "BadRequestError",
    "Client",
    "ConflictError",
    "DownloadError",
    "GatewayUnreachableError",
    "JobNotSucceededError",
    "NetworkError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RateLimitError",
    "ServerError",
    "ServiceUnavailableError",
    "ValidationError",
    "VideogenError",
    "WaitTimeoutError",
    "job_id_of",
]
