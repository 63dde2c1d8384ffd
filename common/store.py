"""The object store: job records, inputs and outputs in one bucket.

Single-object reads, writes and deletes (records, index entries, quota markers, inputs), which a
submission makes several of, go out on the event loop as aiohttp requests built and signed by
minio's own helpers (`BaseURL`, `sign_v4_s3`): about a third of the CPU of the same request made
by minio's blocking client on a thread (bench/store_client.py). Everything else (bucket and
lifecycle setup, listings, uploads of finished videos, presigned links) uses the `minio` client,
whose calls run on a pool of threads so the event loop keeps serving.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import random
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from xml.etree import ElementTree

import aiohttp
import urllib3
import urllib3.exceptions
import yarl
from minio import Minio
from minio.credentials import Credentials
from minio.error import MinioException, S3Error
from minio.helpers import BaseURL
from minio.signer import sign_v4_s3

from common.settings import CommonSettings
from schemas.jobs import JobRecord

# The ids of the lifecycle rules the service sets (`ObjectStore.expire_after`); other rules are left alone.
EXPIRY_RULE_PREFIX = "videogen-expire-"


class ForeignLifecycleRules(Exception):
    """The bucket has lifecycle rules that are not the service's: the service does not rewrite them."""

    def __init__(self, rule_ids: list[str | None]) -> None:
        super().__init__(
            f"the bucket has lifecycle rules of its own ({', '.join(repr(r) for r in rule_ids)}), which the "
            "service does not rewrite: set the retention rules beside them by hand"
        )


def _rule_terms(rule: Any) -> tuple[Any, ...]:
    """What a lifecycle rule says, to compare a bucket's rules with the wanted ones."""
    days = rule.expiration.days if rule.expiration is not None else None
    prefix = rule.rule_filter.prefix if rule.rule_filter is not None else None
    return (rule.rule_id, rule.status, prefix, days)


def record_key(job_id: str) -> str:
    return f"jobs/{job_id}/job.json"


def output_key(job_id: str, attempt: int = 1) -> str:
    """Where a run uploads the job's video: one key per attempt (the first `video.mp4`), so a run
    whose delivery was lost never replaces the video of the run that took the job over."""
    return f"jobs/{job_id}/video.mp4" if attempt <= 1 else f"jobs/{job_id}/video-{attempt}.mp4"


# Index entries sort newest first: S3 lists keys in ascending order, so the time is inverted.
_INDEX_EPOCH_MS = 10**13


def index_key(job_id: str, model: str, created_at: datetime, owner: str | None) -> str:
    """An empty object that lists the job newest first, named `<stamp>-<job id>.<model>` (so a
    listing for one model skips others by name): under the owner's prefix when the job has one
    (each caller lists only its own), else under `index/`."""
    return f"{index_prefix(owner)}{_INDEX_EPOCH_MS - int(created_at.timestamp() * 1000):013d}-{job_id}.{model}"


def index_prefix(owner: str | None) -> str:
    return "index/jobs/" if owner is None else f"index/owners/{owner}/jobs/"


def job_id_of_index(key: str) -> str:
    return key.rsplit("/", 1)[-1].split("-", 1)[1].split(".", 1)[0]


def model_of_index(key: str) -> str | None:
    """The model an index entry names (None for entries of earlier versions, which name none)."""
    name = key.rsplit("/", 1)[-1]
    return name.split(".", 1)[1] if "." in name else None


def active_key(owner: str, job_id: str) -> str:
    """An empty object per queued or running job of an API key: what its job quota counts."""
    return f"{active_prefix(owner)}{job_id}"


def active_prefix(owner: str) -> str:
    return f"active/{owner}/"


def job_id_of_active(key: str) -> str:
    return key.rsplit("/", 1)[-1]


def input_key(job_id: str, name: str, ext: str) -> str:
    """Built from our own names only: the job id we made, the input's role, the format we detected."""
    return f"jobs/{job_id}/input/{name}.{ext}"


# The minio client is synchronous: its calls run on a pool of this many threads, each with its own
# connection, so that many requests (a gateway's submissions, say) reach the store at once.
STORE_THREADS = 32
# The single-object requests made on the event loop share at most this many connections.
STORE_CONNECTIONS = 64
# Those requests are tried again (after 0.2 s, then 0.4 s) when the store answers 500 to 504 or a
# connection fails, but not after the store took the request and then did not answer in time (the
# minio client's calls are retried alike).
_RETRIES = 2
_RETRY_STATUSES = frozenset({500, 502, 503, 504})
# A body must be sent within s3_timeout_s plus a second per this many bytes, or the call fails
# (the answer is waited for with s3_timeout_s between bytes); smaller bodies fit the socket buffers.
_SEND_BYTES_PER_S = 1 << 20
_BUFFERED_BYTES = 1 << 16


class StoreError(Exception):
    """The store answered a single-object request with an S3 error (`code`, HTTP `status`)."""

    def __init__(self, message: str, code: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.code, self.status = code, status


class StoreUnanswered(StoreError):
    """No answer came: the connection failed or was lost, or the store did not answer within
    s3_timeout_s. A write's outcome is then unknown."""


# What the store client raises when the store cannot be reached, times out or answers with an
# error: urllib3's connection and protocol errors, minio's S3 and server errors, and StoreError.
STORE_ERRORS: tuple[type[Exception], ...] = (urllib3.exceptions.HTTPError, MinioException, StoreError)


def _error_of(status: int, body: bytes, key: str) -> StoreError:
    """The S3 error an answer carries (its `Code` element; a HEAD's or a bare answer's has none)."""
    code = message = None
    try:
        root = ElementTree.fromstring(body)
        code, message = root.findtext("Code"), root.findtext("Message")
    except Exception:
        pass
    if code is None and status == 404:
        code = "NoSuchKey"
    return StoreError(f"S3 error {status} {code or ''} for {key}: {message or body[:200]!r}", code, status)


class RecordChanged(Exception):
    """A conditional write found the object (a job record, an idempotency record) no longer as it
    was read: somebody else wrote it."""


# What S3 stores answer when a write's precondition fails; and AWS's answer to a conditional write
# that raced another write of the same key, which is to be sent again (it then succeeds or fails
# its precondition).
_PRECONDITION_FAILED = "PreconditionFailed"
_RACED = "ConditionalRequestConflict"
_RACED_TRIES = 5

# How often `update_record` reads again after losing a race before it gives up.
UPDATE_TRIES = 10


class _Retry(urllib3.Retry):
    """urllib3's retries, except after a read that timed out: a store that does not answer one
    call in s3_timeout_s fails it at once. (A connection the store closed just as it was reused,
    also a read error to urllib3, is still tried again.)"""

    def increment(self, method=None, url=None, response=None, error=None, _pool=None, _stacktrace=None):  # type: ignore[no-untyped-def]
        if isinstance(error, urllib3.exceptions.ReadTimeoutError):
            raise urllib3.exceptions.MaxRetryError(_pool, url, error) from error
        return super().increment(method, url, response, error, _pool, _stacktrace)


class ObjectStore:
    def __init__(self, settings: CommonSettings, public_endpoint: str | None = None) -> None:
        self.bucket = settings.s3_bucket
        http = urllib3.PoolManager(
            # A store that accepts connections but does not answer (hung, overloaded) fails a call
            # after s3_timeout_s, once: a read that timed out is not tried again here (the gateway
            # answers 503; workers retry with their own patience). Other errors are (_Retry).
            timeout=urllib3.Timeout(connect=3.0, read=settings.s3_timeout_s),
            retries=_Retry(total=2, backoff_factor=0.2, status_forcelist=(500, 502, 503, 504)),
            maxsize=STORE_THREADS,
        )
        self._threads = ThreadPoolExecutor(max_workers=STORE_THREADS, thread_name_prefix="store")
        self._client = self._make_client(settings, settings.s3_endpoint, settings.s3_secure, http)
        # Presigned URLs are bound to the host they are signed for, so sign with the host clients use.
        if public_endpoint:
            parts = urlsplit(public_endpoint if "://" in public_endpoint else f"http://{public_endpoint}")
            self._signer = self._make_client(settings, parts.netloc, parts.scheme == "https", http)
        else:
            self._signer = self._client
        self._base_url = BaseURL(
            f"{'https' if settings.s3_secure else 'http'}://{settings.s3_endpoint}", settings.s3_region
        )
        self._region = settings.s3_region
        self._credentials = Credentials(settings.s3_access_key, settings.s3_secret_key.get_secret_value())
        self._timeout_s = settings.s3_timeout_s
        self._http_timeout = aiohttp.ClientTimeout(total=None, sock_connect=3.0, sock_read=settings.s3_timeout_s)
        self._http: aiohttp.ClientSession | None = None
        self._http_loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    def _session(self) -> aiohttp.ClientSession:
        """The aiohttp session of the running event loop (made on first use; a new one for a new loop)."""
        if self._closed:
            raise StoreUnanswered("the store client is closed")
        loop = asyncio.get_running_loop()
        if self._http is None or self._http_loop is not loop:
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=STORE_CONNECTIONS),
                timeout=self._http_timeout,
                auto_decompress=False,
            )
            self._http_loop = loop
        return self._http

    async def close(self) -> None:
        """Close the event loop's connections and the minio client's threads; later calls fail."""
        self._closed = True
        if self._http is not None:
            await self._http.close()
        self._threads.shutdown(wait=False)

    async def _request(
        self, method: str, key: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[bytes, str]:
        """One signed S3 request for the object at `key`: (the answer's body, its ETag). Raises
        StoreError for an error answer, StoreUnanswered when none came."""
        url = self._base_url.build(method=method, region=self._region, bucket_name=self.bucket, object_name=key)
        if len(body) > 1 << 20:  # hashing megabytes would hold the event loop
            content_sha256 = await asyncio.to_thread(lambda: hashlib.sha256(body).hexdigest())
        else:
            content_sha256 = hashlib.sha256(body).hexdigest()
        target, timeout = yarl.URL(url.geturl(), encoded=True), self._http_timeout
        if len(body) > _BUFFERED_BYTES:  # sending could stall, which sock_read does not cover
            timeout = aiohttp.ClientTimeout(
                total=self._timeout_s + len(body) / _SEND_BYTES_PER_S, sock_connect=3.0, sock_read=self._timeout_s
            )
        for attempt in range(_RETRIES + 1):
            if attempt:
                await asyncio.sleep(0.2 * 2 ** (attempt - 1))
            session = self._session()  # refuses once the client is closed, also between tries
            date = datetime.now(UTC)
            signed = sign_v4_s3(
                method=method,
                url=url,
                region=self._region,
                headers={
                    **(headers or {}),
                    "Host": url.netloc,
                    "Accept-Encoding": "identity",  # the bytes as stored, even through a compressing proxy
                    "x-amz-content-sha256": content_sha256,
                    "x-amz-date": date.strftime("%Y%m%dT%H%M%SZ"),
                },
                credentials=self._credentials,
                content_sha256=content_sha256,
                date=date,
            )
            try:
                async with session.request(
                    method, target, data=body or None, headers=signed, timeout=timeout
                ) as response:
                    data = await response.read()
                    status, etag = response.status, response.headers.get("ETag", "").strip('"')
            except aiohttp.ConnectionTimeoutError as exc:  # no connection: tried again
                failed: BaseException = exc
            except TimeoutError as exc:  # the request went out (or part of it) and no answer came in time
                raise StoreUnanswered(f"no answer from the store within its time-out for {method} {key}") from exc
            except (aiohttp.ClientError, OSError) as exc:
                failed = exc
            else:
                if status < 300:
                    return data, etag
                if status not in _RETRY_STATUSES or attempt == _RETRIES:
                    raise _error_of(status, data, key)
                continue
            if self._closed:
                raise StoreUnanswered(f"the store client was closed during {method} {key}") from failed
            if attempt == _RETRIES:
                raise StoreUnanswered(f"the store could not be reached for {method} {key}: {failed!r}") from failed
        raise AssertionError("unreachable")

    async def _run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if self._closed:
            raise StoreUnanswered("the store client is closed")
        return await asyncio.get_running_loop().run_in_executor(self._threads, functools.partial(fn, *args, **kwargs))

    @staticmethod
    def _make_client(settings: CommonSettings, endpoint: str, secure: bool, http: urllib3.PoolManager) -> Minio:
        # With the region given, presigning is pure computation: no request to the store.
        return Minio(
            endpoint,
            access_key=settings.s3_access_key,
            secret_key=settings.s3_secret_key.get_secret_value(),
            secure=secure,
            region=settings.s3_region,
            http_client=http,
        )

    async def ensure_bucket(self) -> None:
        def run() -> None:
            if not self._client.bucket_exists(self.bucket):
                try:
                    self._client.make_bucket(self.bucket)
                except S3Error as exc:
                    if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise

        await self._run(run)

    async def expire_after(self, prefixes: list[str], days: int | None) -> bool:
        """A bucket lifecycle rule per prefix, `videogen-expire-<prefix>`: the store deletes those
        objects `days` after they were written (None: no such rules). Returns whether the
        configuration had to change; raises ForeignLifecycleRules, changing nothing, when it must
        change and the bucket has rules of its own."""
        from minio.commonconfig import ENABLED, Filter
        from minio.lifecycleconfig import Expiration, LifecycleConfig, Rule

        ours = [
            Rule(
                ENABLED,
                rule_filter=Filter(prefix=prefix),
                rule_id=f"{EXPIRY_RULE_PREFIX}{prefix.strip('/')}",
                expiration=Expiration(days=days),
            )
            for prefix in prefixes
            if days is not None
        ]

        def run() -> bool:
            current = self._client.get_bucket_lifecycle(self.bucket)
            rules = list(current.rules) if current is not None else []
            mine = [r for r in rules if (r.rule_id or "").startswith(EXPIRY_RULE_PREFIX)]
            if sorted(map(_rule_terms, mine), key=repr) == sorted(map(_rule_terms, ours), key=repr):
                return False  # as wanted (the bucket's other rules, if any, are not looked at)
            others = [r.rule_id for r in rules if r not in mine]
            if others:
                # S3 writes a lifecycle configuration as a whole, and minio's parsed rules do not
                # carry every element of every rule (older filters, size limits, store-specific
                # actions): rewriting them could change what they delete. Left to the owner.
                raise ForeignLifecycleRules(others)
            if ours:
                self._client.set_bucket_lifecycle(self.bucket, LifecycleConfig(ours))
            else:
                self._client.delete_bucket_lifecycle(self.bucket)
            return True

        return await self._run(run)

    async def ping(self, timeout: float = 3.0) -> bool:
        try:
            return await asyncio.wait_for(self._run(self._client.bucket_exists, self.bucket), timeout)
        except Exception:
            return False

    async def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        await self._request("PUT", key, data, {"Content-Type": content_type})

    async def put_file(self, key: str, path: Path, content_type: str) -> None:
        await self._run(self._client.fput_object, self.bucket, key, str(path), content_type=content_type)

    async def get_bytes(self, key: str) -> bytes | None:
        found = await self.get_tagged(key)
        return None if found is None else found[0]

    async def list_keys(self, prefix: str, start_after: str | None, limit: int, before: str | None = None) -> list[str]:
        """Up to `limit` keys under `prefix`, in name order, after `start_after` and before `before`."""

        def run() -> list[str]:
            keys = []
            for item in self._client.list_objects(self.bucket, prefix=prefix, recursive=True, start_after=start_after):
                if before is not None and item.object_name >= before:
                    break
                keys.append(item.object_name)
                if len(keys) >= limit:
                    break
            return keys

        return await self._run(run)

    async def delete(self, key: str) -> None:
        """Remove an object; removing one that is not there is no error."""
        await self._request("DELETE", key)

    async def put_record(self, record: JobRecord) -> None:
        """Write the record whatever is stored: for a job nobody else knows of yet."""
        await self.put_bytes(record_key(record.job_id), record.model_dump_json().encode(), "application/json")

    async def get_record(self, job_id: str) -> JobRecord | None:
        found = await self.get_record_tagged(job_id)
        return None if found is None else found[0]

    async def get_record_tagged(self, job_id: str) -> tuple[JobRecord, str] | None:
        """The record and its ETag, which `replace_record` takes to write only over this version."""
        found = await self.get_tagged(record_key(job_id))
        return None if found is None else (JobRecord.model_validate_json(found[0]), found[1])

    async def replace_record(self, record: JobRecord, etag: str | None) -> str:
        """Write the record only over the version with this ETag (see `put_if`)."""
        return await self.put_if(record_key(record.job_id), record.model_dump_json().encode(), etag)

    async def get_tagged(self, key: str) -> tuple[bytes, str] | None:
        """An object's bytes and ETag, which `put_if` takes to write only over this version (None
        if there is no such object)."""
        try:
            return await self._request("GET", key)
        except StoreError as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject"):
                return None
            raise

    async def put_if(self, key: str, data: bytes, etag: str | None, content_type: str = "application/json") -> str:
        """Write the object only over the version with this ETag (None: only where there is none
        yet), as one conditional PUT (`If-Match`, `If-None-Match`); returns the new ETag.

        Raises RecordChanged if somebody else wrote the object since. A write that found its own
        bytes already there (the store took it, then the answer was lost and the write retried)
        counts as done, and so does one whose answer never came (a read time-out, a connection
        lost) if the object now holds its bytes; otherwise that error is raised.
        """
        condition = {"If-None-Match": "*"} if etag is None else {"If-Match": f'"{etag}"'}

        async def ours() -> str | None:
            """The stored object's ETag if it holds these bytes."""
            stored = await self.get_tagged(key)
            return stored[1] if stored is not None and stored[0] == data else None

        headers = {"Content-Type": content_type, **condition}
        for attempt in range(_RACED_TRIES):
            if attempt:
                await asyncio.sleep(0.05 * 2**attempt)  # let the other write land
            try:
                return (await self._request("PUT", key, data, headers))[1]
            except StoreError as exc:
                if exc.code == _PRECONDITION_FAILED:
                    break
                if exc.code == _RACED:
                    continue
                if not isinstance(exc, StoreUnanswered) and (exc.status or 0) < 500:
                    raise
                # No answer, or only server errors (the store, or a proxy in front, may have taken
                # it before it failed): the outcome is unknown until the object is read.
                try:
                    written = await ours()
                except Exception:
                    raise exc from None  # still no answer: the outcome stays unknown
                if written is not None:
                    return written
                raise
        # Refused (or raced every time): unless the bytes there are these, somebody else wrote.
        if (written := await ours()) is not None:
            return written
        raise RecordChanged(key)

    async def update_record(
        self, job_id: str, change: Callable[[JobRecord], JobRecord | None]
    ) -> tuple[JobRecord | None, bool]:
        """Read, change, write only if nobody wrote in between, else read again: (the record as
        it now is, whether `change` was written). `change` returns None to leave the record be."""
        for attempt in range(UPDATE_TRIES):
            if attempt:  # a worker writing at every step: let it, then read again (at most ~1.5 s in all)
                await asyncio.sleep(random.uniform(0.5, 1.0) * min(0.01 * 2**attempt, 0.3))
            found = await self.get_record_tagged(job_id)
            if found is None:
                return None, False
            record, etag = found
            changed = change(record)
            if changed is None:
                return record, False
            try:
                await self.replace_record(changed, etag)
            except RecordChanged:
                continue
            return changed, True
        raise RecordChanged(job_id)

    def presign(self, key: str, expires_s: int, method: str = "GET") -> tuple[str, datetime]:
        """A link to the object for one HTTP method (`GET` or `HEAD`): the signature covers the
        method, so the store refuses any other (403)."""
        expires = timedelta(seconds=expires_s)
        url = self._signer.get_presigned_url(method, self.bucket, key, expires=expires)
        return url, datetime.now(UTC) + expires
