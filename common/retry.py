"""Patience with the object store: a worker holding a job waits out a store outage (its broker
connection, and so its claim on the job, stays alive) instead of handing the job back; a gateway
waits a few seconds before it gives up remembering an Idempotency-Key."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog

from common.store import RecordChanged

log = structlog.get_logger("store")

T = TypeVar("T")


async def patiently(op: Callable[[], Awaitable[T]], patience_s: float, what: str, log_as: str = "store_retry") -> T:
    """Run `op`, retrying with backoff (0.5 s doubling to 10 s) until it succeeds or `patience_s`
    passes, logging each retry as `log_as`. A conditional write that lost to another writer is an
    answer, not an outage: it is raised at once."""
    deadline = time.monotonic() + patience_s
    delay = 0.5
    while True:
        try:
            return await op()
        except RecordChanged:
            raise
        except Exception as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning(log_as, operation=what, error=str(exc) or type(exc).__name__, retry_in_s=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
