"""Clients of the videogen gateway's HTTP API: `AsyncClient` (aiohttp) and `Client` (blocking).

`Client` runs an `AsyncClient` on a private event loop in a background thread, so both share
every request, stream and error path.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import inspect
import json
import os
import re
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from contextlib import ExitStack, asynccontextmanager
from pathlib import Path
from typing import IO, Any, Concatenate, ParamSpec, TypeVar
from urllib.parse import urlsplit

import aiohttp

from videogen_client.errors import (
    APIError,
    DownloadError,
    GatewayUnreachableError,
    JobNotSucceededError,
    NetworkError,
    WaitTimeoutError,
    api_error,
    error_from_response,
)

__all__ = ["DEFAULT_URL", "TERMINAL_STATUSES", "AsyncClient", "Client", "job_id_of"]

DEFAULT_URL = "http://127.0.0.1:8080"
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
USER_AGENT = "videogen-client/0.1"

# An image or video to upload: a path, the file's bytes, or a binary file object.
FileInput = str | os.PathLike[str] | bytes | IO[bytes]
# A job: its id, or any mapping with a `job_id` (a job object, the answer to `generate`, an event).
JobRef = str | Mapping[str, Any]
Job = dict[str, Any]
EventCallback = Callable[[dict[str, Any]], Awaitable[None] | None]

P = ParamSpec("P")
T = TypeVar("T")


def job_id_of(job: JobRef) -> str:
    """The id of a job given as an id or as a mapping with `job_id`."""
    if isinstance(job, str):
        return job
    if isinstance(job, Mapping) and isinstance(job.get("job_id"), str):
        return job["job_id"]
    raise TypeError(f"expected a job id or a mapping with 'job_id', got {type(job).__name__}")


class AsyncClient:
    """The gateway's API over aiohttp. Use it as `async with AsyncClient() as client:`, or call `close()`.

    `url` defaults to `$VIDEOGEN_URL`, else `http://127.0.0.1:8080`; `api_key` to `$VIDEOGEN_API_KEY`.
    The key is sent as `Authorization: Bearer` to the gateway only; presigned video links are
    fetched without it. `timeout` bounds the wait for each answer (the gateway's own limit is
    300 s), `connect_timeout` the connection, and `stream_idle_timeout` the silence on an event
    stream (the gateway pings every 20 s) before it is reopened. A stream cut before its job has
    ended is reopened from the last event, at most `max_reconnects` times in a row.
    """

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 330.0,
        connect_timeout: float = 10.0,
        stream_idle_timeout: float = 60.0,
        max_reconnects: int = 5,
    ) -> None:
        self.url = (url or os.environ.get("VIDEOGEN_URL") or DEFAULT_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("VIDEOGEN_API_KEY") or None
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.stream_idle_timeout = stream_idle_timeout
        self.max_reconnects = max_reconnects
        self._gateway_session: aiohttp.ClientSession | None = None
        self._store_session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(url={self.url!r})"

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the HTTP sessions. The client opens new ones if it is used again."""
        for session in (self._gateway_session, self._store_session):
            if session is not None and not session.closed:
                await session.close()
        self._gateway_session = self._store_session = None

    # -- jobs ---------------------------------------------------------------------------------

    async def generate(
        self,
        prompt: str,
        *,
        image: FileInput | None = None,
        video: FileInput | None = None,
        model: str | None = None,
        width: int | None = None,
        height: int | None = None,
        num_frames: int | None = None,
        fps: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        priority: str | None = None,
        tier: str | None = None,
        negative_prompt: str | None = None,
        strength: float | None = None,
        webhook_url: str | None = None,
        webhook_events: Sequence[str] | None = None,
        idempotency_key: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> Job:
        """Submit a job and return the gateway's `202` answer (`job_id`, `status`, the resolved `request`, ...).

        Text-to-video without `image` and `video`; image-to-video with `image`, video-to-video with
        `video` (either one a path, bytes or a binary file, sent as a multipart upload). `steps` is
        the request's `num_inference_steps` and `guidance` its `guidance_scale`; every field left
        `None` takes the model's default. `strength` is for video-to-video only. `extra` adds
        request fields this client does not name. `idempotency_key` is sent as `Idempotency-Key`.
        """
        if image is not None and video is not None:
            raise ValueError("give an image (image-to-video) or a video (video-to-video), not both")
        fields: dict[str, Any] = {
            "prompt": prompt,
            "negative_prompt": negative_prompt,
            "model": model,
            "width": width,
            "height": height,
            "num_frames": num_frames,
            "fps": fps,
            "num_inference_steps": steps,
            "guidance_scale": guidance,
            "seed": seed,
            "priority": priority,
            "tier": tier,
            "strength": strength,
            "webhook_url": webhook_url,
            "webhook_events": list(webhook_events) if webhook_events is not None else None,
            **(extra or {}),
        }
        fields = {name: value for name, value in fields.items() if value is not None}
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key is not None else None
        if image is None and video is None:
            return await self._request("POST", "/api/v1/generate/text-to-video", json_body=fields, headers=headers)
        part, source = ("image", image) if image is not None else ("video", video)
        with ExitStack() as files:
            form = aiohttp.FormData()
            for name, value in fields.items():
                form.add_field(name, _form_text(value))
            content, filename = _upload(source, part, files)
            form.add_field(part, content, filename=filename, content_type="application/octet-stream")
            return await self._request("POST", f"/api/v1/generate/{part}-to-video", data=form, headers=headers)

    async def get_job(self, job: JobRef) -> Job:
        """The job object (status, phase, progress, ETA, request, result with a fresh presigned `url`, error)."""
        return await self._request("GET", f"/api/v1/jobs/{job_id_of(job)}")

    async def list_jobs(
        self,
        *,
        status: str | None = None,
        model: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        """A page of the caller's jobs, newest first: `{"jobs": [...], "next_cursor": str | None}`.

        Pass `next_cursor` back as `cursor` for the next page (with the same `model`)."""
        params = {"status": status, "model": model, "limit": limit, "cursor": cursor}
        return await self._request("GET", "/api/v1/jobs", params=params)

    async def cancel(self, job: JobRef) -> Job:
        """Cancel a job; returns the job: `cancelled` if it was still queued, `running` if it stops shortly.

        A job that has already ended raises `ConflictError` (`job_finished`)."""
        return await self._request("POST", f"/api/v1/jobs/{job_id_of(job)}/cancel")

    # -- models -------------------------------------------------------------------------------

    async def models(self) -> dict[str, Any]:
        """Every model: `{"default_model": id, "models": [{id, family, modes, defaults, limits, workers, ...}]}`."""
        return await self._request("GET", "/api/v1/models")

    async def model_info(self, model: str | None = None) -> dict[str, Any]:
        """One model (the default model without `model`)."""
        return await self._request("GET", "/api/v1/model/info", params={"model": model})

    # -- events -------------------------------------------------------------------------------

    async def events(self, job: JobRef, *, since: int | None = None, reconnect: bool = True) -> AsyncIterator[Job]:
        """The job's events from the WebSocket `/api/v1/ws`, in `seq` order: its history, then live events.

        Ends after the terminal event (`succeeded`, `failed` or `cancelled`; that frame carries the
        final job as `job`). `since` starts after that `seq`. When the stream is cut before the end
        (a gateway restarting, a lost connection), it is reopened after the last event received,
        unless `reconnect` is false.
        """
        job_id = job_id_of(job)
        last = since
        opened = False  # a gateway that cannot be reached at all is an error at once, not after retries
        failures = 0
        while True:
            params = {"job_id": job_id} if last is None else {"job_id": job_id, "since": str(last)}
            cause: BaseException | None = None
            try:
                async with self._stream(params) as ws:
                    opened = True
                    while True:
                        message = await ws.receive(timeout=self.stream_idle_timeout)
                        if message.type is not aiohttp.WSMsgType.TEXT:
                            break
                        event = json.loads(message.data)
                        last, failures = event.get("seq", last), 0
                        yield event
                        if event.get("status") in TERMINAL_STATUSES:
                            return
                if not reconnect:
                    return
                current = await self.get_job(job_id)
                if current.get("status") in TERMINAL_STATUSES and last is not None and last >= current.get("seq", 0):
                    return  # everything up to the end has been delivered
            except (GatewayUnreachableError, NetworkError) as exc:
                if not (reconnect and opened):
                    raise
                cause = exc
            except TimeoutError as exc:
                if not (reconnect and opened):
                    raise NetworkError(f"no event from the gateway for {self.stream_idle_timeout:g} s") from exc
                cause = exc
            failures += 1
            if failures > self.max_reconnects:
                raise NetworkError(
                    f"the event stream of job {job_id} was cut {failures} times in a row before the job ended"
                ) from cause
            await asyncio.sleep(min(0.25 * 2**failures, 5.0))

    async def wait(self, job: JobRef, *, timeout: float | None = None, on_event: EventCallback | None = None) -> Job:
        """Follow the job until it ends and return the final job object, whatever its status.

        `on_event` is called with each event (and awaited if it returns an awaitable). With
        `timeout` (seconds), raises `WaitTimeoutError` if the job has not ended by then.
        """
        job_id = job_id_of(job)

        async def follow() -> Job:
            async for event in self.events(job_id):
                if on_event is not None:
                    outcome = on_event(event)
                    if inspect.isawaitable(outcome):
                        await outcome
                if event.get("status") in TERMINAL_STATUSES:
                    return event.get("job") or await self.get_job(job_id)
            return await self.get_job(job_id)

        try:
            async with asyncio.timeout(timeout) as deadline:
                return await follow()
        except TimeoutError as exc:
            if deadline.expired():
                raise WaitTimeoutError(
                    f"job {job_id} did not end within {timeout:g} s; it goes on", job_id=job_id
                ) from exc
            raise

    async def download(self, job: JobRef, path: str | os.PathLike[str] | None = None) -> Path:
        """Save a succeeded job's MP4 and return where it went.

        `job` is a job object (its presigned `result.url` is used; an expired link is signed anew)
        or a job id (the job is read first). `path` is a file, or an existing directory to save
        `<job_id>.mp4` into; by default `<job_id>.mp4` in the current directory. The link is
        fetched without the API key. Raises `JobNotSucceededError` if the job has no video.
        """
        given = isinstance(job, Mapping) and job.get("status") == "succeeded" and (job.get("result") or {}).get("url")
        current = dict(job) if given else await self.get_job(job)
        url = _video_url(current)
        name = f"{current['job_id']}.mp4"
        target = Path(path) if path is not None else Path(name)
        if target.is_dir():
            target = target / name
        try:
            await self._fetch(url, target)
        except DownloadError as exc:
            if not (given and exc.status == 403):
                raise
            # The link in the caller's job object may have expired: read the job for a new one.
            await self._fetch(_video_url(await self.get_job(current["job_id"])), target)
        return target

    # -- plumbing -----------------------------------------------------------------------------

    def _gateway(self) -> aiohttp.ClientSession:
        if self._gateway_session is None or self._gateway_session.closed:
            headers = {"User-Agent": USER_AGENT}
            if self.api_key:
                headers["Authorization"] = f"Bearer {self.api_key}"
            self._gateway_session = aiohttp.ClientSession(headers=headers, timeout=self._client_timeout())
        return self._gateway_session

    def _store(self) -> aiohttp.ClientSession:
        """For presigned links: never the API key (the store refuses a second authorization)."""
        if self._store_session is None or self._store_session.closed:
            self._store_session = aiohttp.ClientSession(
                headers={"User-Agent": USER_AGENT}, timeout=self._client_timeout()
            )
        return self._store_session

    def _client_timeout(self) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout, sock_read=self.timeout)

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json_body: Any = None,
        data: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        query = {name: str(value) for name, value in (params or {}).items() if value is not None}
        try:
            async with self._gateway().request(
                method, self.url + path, params=query, json=json_body, data=data, headers=headers
            ) as response:
                status, answer_headers, body = response.status, response.headers, await response.read()
        except aiohttp.ClientConnectorError as exc:
            raise self._unreachable(exc) from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise NetworkError(f"{method} {path} to the gateway at {self.url} failed: {_describe(exc)}") from exc
        if status >= 400:
            raise error_from_response(status, body, answer_headers)
        try:
            return json.loads(body) if body else None
        except ValueError as exc:
            raise APIError(
                f"the gateway answered {method} {path} with {status} and a body that is not JSON",
                status=status,
                code="bad_response",
            ) from exc

    @asynccontextmanager
    async def _stream(self, params: Mapping[str, str]) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
        try:
            ws = await self._gateway().ws_connect(self.url + "/api/v1/ws", params=params)
        except aiohttp.WSServerHandshakeError as exc:
            # aiohttp does not keep a refused handshake's body: ask again without the upgrade. The
            # gateway runs the same checks first, so the answer carries the error's code and details.
            try:
                await self._request("GET", "/api/v1/ws", params=params)
            except APIError as again:
                if again.status == exc.status:
                    raise again from exc
            raise api_error(
                exc.status, f"http_{exc.status}", f"the gateway refused the event stream: {exc.status} {exc.message}"
            ) from exc
        except aiohttp.ClientConnectorError as exc:
            raise self._unreachable(exc) from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise NetworkError(f"could not open the event stream at {self.url}: {_describe(exc)}") from exc
        try:
            yield ws
        finally:
            await ws.close()

    async def _fetch(self, url: str, target: Path) -> None:
        """GET a presigned link into `target` (through a `.part` file, so a failure leaves no half file)."""
        host = urlsplit(url).netloc
        partial = target.with_name(target.name + ".part")
        try:
            async with self._store().get(url) as response:
                if response.status != 200:
                    raise DownloadError(
                        f"the object store at {host} answered {response.status} for the video link"
                        f"{_store_error(await response.read())}",
                        status=response.status,
                    )
                with partial.open("wb") as out:
                    async for chunk in response.content.iter_chunked(1 << 20):
                        out.write(chunk)
            os.replace(partial, target)
        except aiohttp.ClientError as exc:
            raise DownloadError(f"could not fetch the video from {host}: {_describe(exc)}") from exc
        except TimeoutError as exc:
            raise DownloadError(f"fetching the video from {host} timed out") from exc
        finally:
            partial.unlink(missing_ok=True)

    def _unreachable(self, exc: aiohttp.ClientConnectorError) -> GatewayUnreachableError:
        os_error = exc.os_error
        refused = isinstance(os_error, ConnectionRefusedError) or getattr(os_error, "errno", None) == errno.ECONNREFUSED
        reason = "connection refused" if refused else _describe(exc)
        return GatewayUnreachableError(
            f"the videogen gateway at {self.url} is not reachable ({reason}). Start the local stack with "
            "`scripts/stack up`, or point VIDEOGEN_URL (--url on the command line) at a running gateway."
        )


def _blocking(
    method: Callable[Concatenate[AsyncClient, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[Client, P], T]:
    """The blocking form of an `AsyncClient` method: run it on the `Client`'s loop and wait."""

    @functools.wraps(method)
    def call(self: Client, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._run(method(self._async, *args, **kwargs))

    return call


class Client:
    """The blocking client: the same methods as `AsyncClient`, without `await`.

    It runs an `AsyncClient` on an event loop of its own in a background thread. Use it as
    `with Client() as client:`, or call `close()`. It may be used from several threads; callbacks
    given to `wait(on_event=...)` run on the client's thread and must not call the client.
    """

    def __init__(self, url: str | None = None, api_key: str | None = None, **options: Any) -> None:
        self._async = AsyncClient(url, api_key, **options)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="videogen-client", daemon=True)
        self._thread.start()
        self._closed = False

    @property
    def url(self) -> str:
        return self._async.url

    @property
    def api_key(self) -> str | None:
        return self._async.api_key

    def __repr__(self) -> str:
        return f"{type(self).__name__}(url={self.url!r})"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the HTTP sessions and stop the client's thread. Idempotent."""
        if self._closed:
            return
        try:
            self._run(self._async.close())
        finally:
            self._closed = True
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    generate = _blocking(AsyncClient.generate)
    get_job = _blocking(AsyncClient.get_job)
    list_jobs = _blocking(AsyncClient.list_jobs)
    cancel = _blocking(AsyncClient.cancel)
    models = _blocking(AsyncClient.models)
    model_info = _blocking(AsyncClient.model_info)
    wait = _blocking(AsyncClient.wait)
    download = _blocking(AsyncClient.download)

    def events(self, job: JobRef, *, since: int | None = None, reconnect: bool = True) -> Iterator[Job]:
        """The job's events as a blocking iterator; see `AsyncClient.events`."""
        stream = self._async.events(job, since=since, reconnect=reconnect)
        try:
            while True:
                more, event = self._run(_next(stream))
                if not more:
                    return
                yield event
        finally:
            if not self._closed:
                self._run(stream.aclose())

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            coroutine.close()
            raise RuntimeError("this Client is closed")
        if threading.current_thread() is self._thread:
            coroutine.close()
            raise RuntimeError("a Client cannot be called from its own callbacks; use an AsyncClient there")
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # interrupted (Ctrl-C): stop the request too
            raise


async def _next(stream: AsyncIterator[T]) -> tuple[bool, T | None]:
    try:
        return True, await anext(stream)
    except StopAsyncIteration:
        return False, None


def _form_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def _upload(source: FileInput, part: str, files: ExitStack) -> tuple[Any, str]:
    """What to send as the file part, and its file name (the gateway ignores the name)."""
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source), part
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        return files.enter_context(path.open("rb")), path.name
    return source, Path(str(getattr(source, "name", part))).name


def _video_url(job: Mapping[str, Any]) -> str:
    """The presigned link of a succeeded job's video; JobNotSucceededError for any other job."""
    url = (job.get("result") or {}).get("url")
    if job.get("status") != "succeeded" or not url:
        raise JobNotSucceededError(_no_video(job), job=dict(job))
    return url


def _no_video(job: Mapping[str, Any]) -> str:
    job_id, status = job.get("job_id"), job.get("status")
    if status in ("queued", "running"):
        return f"job {job_id} is {status}; it has no video yet (wait for it first)"
    if status == "failed" and job.get("error"):
        error = job["error"]
        return f"job {job_id} failed ({error.get('code')}: {error.get('message')}); it has no video"
    if status == "succeeded":
        return f"job {job_id} succeeded but has no video (a model download job?)"
    return f"job {job_id} ended {status}; it has no video"


def _store_error(body: bytes) -> str:
    """`: <Code>: <Message>` from an S3 error body, if it is one."""
    text = body.decode("utf-8", "replace")
    parts = [m.group(1) for tag in ("Code", "Message") if (m := re.search(rf"<{tag}>(.*?)</{tag}>", text, re.S))]
    return f": {': '.join(parts)}" if parts else ""


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
