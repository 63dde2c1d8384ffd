"""API keys: bearer tokens, stored as SHA-256 hashes, each with its own rate limit and job quota.

A key file (TOML, `VIDEOGEN_API_KEYS_FILE`) lists the keys:

    [[keys]]
    id = "alice"                          # who: recorded as the owner of the jobs the key creates
    sha256 = "<hex SHA-256 of the token>"
    rate_limit = "20/second"              # optional; else VIDEOGEN_RATE_LIMIT
    max_concurrent_jobs = 4               # optional; else VIDEOGEN_MAX_CONCURRENT_JOBS; "unlimited": none
    admin = false                         # optional; admins may start model downloads

`python -m gateway.auth new <id> >> keys.toml` makes a token, appends its entry to the file and
shows the token (on stderr) once. Tokens are 256
random bits, so a plain SHA-256 is enough to keep the file useless to a reader (no salt or slow
hash is needed for secrets that cannot be guessed).
"""

from __future__ import annotations

import hashlib
import math
import secrets
import sys
import time
import tomllib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Literal

from aiohttp import web
from limits import RateLimitItem, parse
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import MovingWindowRateLimiter
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator

from common.settings import check_rate_limit
from gateway.errors import ApiError
from schemas.jobs import JobRecord

TOKEN_PREFIX = "vg_"
# Paths anyone may call: probes, the API description, the web page and its files.
PUBLIC_PATHS = frozenset({"/health", "/ready", "/metrics", "/openapi.json", "/"})
PUBLIC_PREFIXES = ("/static/",)
# Streams opened by browsers cannot send headers: they may pass the token as `access_token`.
QUERY_TOKEN_PATHS = frozenset({"/api/v1/ws", "/api/v1/events"})

OWNER = web.RequestKey("owner", str)  # the key id of the caller; absent when auth is disabled


class ApiKey(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    rate_limit: str | None = None
    # "unlimited": no job quota, and no quota marker per job (a service that queues without limit).
    max_concurrent_jobs: int | Literal["unlimited"] | None = None
    admin: StrictBool = False

    @field_validator("max_concurrent_jobs", mode="before")
    @classmethod
    def _quota(cls, value: object) -> object:
        # One clear rule rather than an error per member of the union; no booleans or numeric strings.
        if value is None or value == "unlimited" or (type(value) is int and value >= 1):
            return value
        raise ValueError('must be a whole number of at least 1, or "unlimited"')

    @field_validator("rate_limit")
    @classmethod
    def _parses(cls, value: str | None) -> str | None:
        return value if value is None else check_rate_limit(value)  # "N/second", "N/minute", ...


API_KEY = web.RequestKey("api_key", ApiKey)


class KeyFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[ApiKey] = Field(default_factory=list)


def hash_token(token: str) -> str:
    # A header's bytes that are not UTF-8 reach us as surrogates (aiohttp decodes with
    # surrogateescape): hashed as they came, they match no key.
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def _problems(data: dict, exc: ValidationError) -> str:
    """Every problem of a key file, naming the entry by its place and id where it has one:
    `[[keys]] 1 ('alice'): max_concurrent_jobs: must be ...`, joined with `; `."""
    entries = data.get("keys") if isinstance(data.get("keys"), list) else []
    lines = []
    for error in exc.errors(include_url=False):
        loc = list(error["loc"])
        where = ".".join(str(part) for part in loc) or "the file"
        if len(loc) >= 2 and loc[0] == "keys" and isinstance(loc[1], int):
            entry = entries[loc[1]] if loc[1] < len(entries) else None
            key_id = entry.get("id") if isinstance(entry, dict) else None
            name = f" ({key_id!r})" if isinstance(key_id, str) else ""
            field = ".".join(str(part) for part in loc[2:]) or "the entry"
            where = f"[[keys]] {loc[1] + 1}{name}: {field}"
        message = error["msg"].removeprefix("Value error, ")
        lines.append(f"{where}: {message} (got {error.get('input')!r})" if "input" in error else f"{where}: {message}")
    return "; ".join(lines)


def load_keys(path: Path) -> list[ApiKey]:
    """The keys of a key file; a clear error naming the file and the entry when it is wrong."""
    try:
        data = tomllib.loads(path.read_text())
        keys = KeyFile.model_validate(data).keys
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"API key file {path}: {exc}") from exc
    except ValidationError as exc:
        raise ValueError(f"API key file {path}: {_problems(data, exc)}") from exc
    problems = []
    for field, what in (("id", "id"), ("sha256", "token hash")):
        first: dict[str, int] = {}
        for place, key in enumerate(keys, 1):
            value = getattr(key, field)
            if value in first:
                # One token for two keys would act as one of them: the other (an admin, say) shadowed.
                shown = repr(value) if field == "id" else f"of {key.id!r}"
                problems.append(f"[[keys]] {place} ({key.id!r}): the {what} {shown} is also entry {first[value]}'s")
            first.setdefault(value, place)
    if problems:
        raise ValueError(f"API key file {path}: " + "; ".join(problems) + "; each key needs its own")
    return keys


class Keys:
    """The configured keys, looked up by the hash of a presented token, and their rate limits."""

    def __init__(self, keys: list[ApiKey], default_rate: str, default_quota: int) -> None:
        self._by_hash = {k.sha256: k for k in keys}
        default = parse(default_rate)
        # Parsed once: the limit is looked up on every request.
        self._rates: dict[str, RateLimitItem] = {k.id: parse(k.rate_limit) if k.rate_limit else default for k in keys}
        self.default_quota = default_quota
        self._limiter = MovingWindowRateLimiter(MemoryStorage())

    def find(self, token: str) -> ApiKey | None:
        # A lookup by hash leaks nothing useful through timing: callers do not choose the hash.
        return self._by_hash.get(hash_token(token))

    def quota(self, key: ApiKey) -> int | None:
        """The key's job quota; None for a key without one (`unlimited`)."""
        if key.max_concurrent_jobs == "unlimited":
            return None
        return key.max_concurrent_jobs or self.default_quota

    async def retry_after(self, key: ApiKey) -> int | None:
        """Count one request for the key: None if allowed, else the seconds until it would be."""
        rate = self._rates[key.id]
        if await self._limiter.hit(rate, key.id):
            return None
        stats = await self._limiter.get_window_stats(rate, key.id)
        return max(1, math.ceil(stats.reset_time - time.time()))


def _presented_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization")
    if header is not None:
        scheme, _, token = header.partition(" ")
        return token.strip() if scheme.lower() == "bearer" and token.strip() else ""
    if request.path in QUERY_TOKEN_PATHS:
        return request.query.get("access_token")
    return None


def auth_middleware(keys: Keys | None) -> Callable:
    """401 without a valid key, 429 past the key's rate; `request[OWNER]` names the key otherwise.

    With `keys` None (auth disabled for local development) every request passes, owner-less.
    """

    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if keys is None or request.method == "OPTIONS" or _is_public(request.path):
            return await handler(request)
        token = _presented_token(request)
        key = keys.find(token) if token else None
        if key is None:
            if token is None:
                reason = "no API key: send `Authorization: Bearer <key>`"
            elif token == "":
                reason = "the Authorization header must be `Bearer <key>`"
            else:
                reason = "unknown API key"
            raise ApiError(401, "unauthorized", reason, headers={"WWW-Authenticate": 'Bearer realm="videogen"'})
        wait = await keys.retry_after(key)
        if wait is not None:
            raise ApiError(
                429,
                "rate_limited",
                f"too many requests for this API key; retry in {wait} s",
                headers={"Retry-After": str(wait)},
            )
        request[OWNER] = key.id
        request[API_KEY] = key
        return await handler(request)

    return middleware


def _is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def owner_of(request: web.Request) -> str | None:
    return request.get(OWNER)


def visible(record: JobRecord, owner: str | None) -> bool:
    """Whether a caller sees a job: not a deleted one; its own key's jobs only, every job when
    auth is disabled."""
    return record.deleted_at is None and (owner is None or record.owner == owner)


def require_admin(request: web.Request) -> None:
    key = request.get(API_KEY)
    if key is not None and not key.admin:
        raise ApiError(403, "forbidden", "this API key may not do this (it needs admin = true)")


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "new":
        print("usage: python -m gateway.auth new <key-id>", file=sys.stderr)
        return 2
    try:
        ApiKey(id=argv[1], sha256="0" * 64)
    except ValidationError:
        print("a key id is 1 to 63 of a-z, 0-9, '_' and '-', starting with a letter or digit", file=sys.stderr)
        return 2
    token = new_token()
    # The entry on stdout (append it to the key file); the token on stderr, so it is never in the file.
    print(f"API key {argv[1]!r} (give it to the client; it is stored nowhere): {token}", file=sys.stderr)
    print(f'[[keys]]\nid = "{argv[1]}"\nsha256 = "{hash_token(token)}"')
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
