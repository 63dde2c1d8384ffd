"""`videogen-worker`: load the configured models, then serve their job queues until SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time

import structlog

from common.logs import configure_logging
from common.settings import WorkerSettings, arguments_or_exit, settings_or_exit
from common.store import ObjectStore
from common.topology import BrokerUnreachable
from worker.health import serve_health
from worker.pipelines import ModelRunner, pick_device, pick_dtype
from worker.worker import Worker

log = structlog.get_logger("worker")


async def run(settings: WorkerSettings) -> bool:
    """Serve until SIGTERM/SIGINT; True if no job was left unfinished."""
    registry = settings.registry()
    unknown = [m for m in settings.serve_models if registry.get(m) is None]
    if unknown or not settings.serve_models:
        raise SystemExit(f"VIDEOGEN_SERVE_MODELS names unknown models {unknown}; known: {sorted(registry.models)}")
    try:
        device = pick_device(settings.device)
    except ValueError as exc:
        raise SystemExit(f"VIDEOGEN_DEVICE: {exc}") from None
    dtype = pick_dtype(settings.dtype, device)
    # Weights load before the broker connection opens: no heartbeats to miss while loading.
    runners = {}
    for model_id in settings.serve_models:
        spec = registry.models[model_id]
        try:
            runners[model_id] = await asyncio.to_thread(ModelRunner.load, spec, settings.models_dir, device, dtype)
            await asyncio.to_thread(runners[model_id].prepare, settings.compile)
        except Exception as exc:  # not there, not a pipeline, no memory for it...: the worker cannot serve it
            log.exception("model_load_failed", model=model_id)
            raise SystemExit(f"model {model_id!r} could not be loaded and prepared: {exc!r}"[:2000]) from None

    store = ObjectStore(settings)
    await _bucket_checked(store, settings)
    worker = Worker(settings, store, runners, registry)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with contextlib.AsyncExitStack() as serving:
        serving.push_async_callback(store.close)
        try:
            await serving.enter_async_context(serve_health(worker, settings.health_host, settings.health_port))
        except OSError as exc:
            raise SystemExit(
                f"cannot listen on {settings.health_host}:{settings.health_port} (VIDEOGEN_HEALTH_PORT): "
                f"{exc.strerror or exc}"
            ) from None
        try:
            await worker.start()
        except BrokerUnreachable as exc:
            raise SystemExit(str(exc)) from None
        await stop.wait()
        log.info("worker_stopping", grace_s=settings.shutdown_grace_s)
        return await worker.stop(settings.shutdown_grace_s)


async def _bucket_checked(
    store: ObjectStore, settings: WorkerSettings, patience_s: float = 30.0, pause_s: float = 1.0
) -> None:
    """The bucket checked (made if missing), retrying for `patience_s` while the store does not
    answer (`store_unreachable_at_start`), as for the broker: the store may be starting too."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            await store.ensure_bucket()
            return
        except Exception as exc:
            if time.monotonic() > deadline:
                raise SystemExit(
                    f"the object store at {settings.s3_endpoint} did not let the bucket be checked within "
                    f"{patience_s:g} s ({exc})"
                ) from None
            log.warning("store_unreachable_at_start", error=str(exc))
            await asyncio.sleep(pause_s)


def main() -> None:
    arguments_or_exit(WorkerSettings, "videogen-worker", sys.argv[1:])
    settings = settings_or_exit(WorkerSettings, "videogen-worker")
    configure_logging(settings.log_level, settings.log_format)
    try:
        clean = asyncio.run(run(settings))
    except SystemExit as exc:
        if exc.code not in (None, 0):
            log.error("worker_exit", reason=str(exc.code))
            sys.exit(2)
        return
    if not clean:
        # The unfinished job is back in its queue; its generation thread cannot be interrupted,
        # and the interpreter would wait for it at exit. A stop is a success: exit 0 now.
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
