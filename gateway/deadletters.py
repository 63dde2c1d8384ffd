"""Jobs that will never run end `failed`: dead-lettered messages, and jobs that waited too long."""

from __future__ import annotations

from typing import Any

import structlog

from common.store import ObjectStore
from gateway.broker import DeadLetterHandler, ExpiryHandler, GatewayBroker
from schemas import errors
from schemas.jobs import JobError, JobRecord, JobStatus, Phase
from schemas.messages import ExpiryCheck, JobEvent, JobMessage
from schemas.registry import Registry

log = structlog.get_logger("gateway.deadletters")


def explain(job: JobMessage, reason: str, death: dict[str, Any], registry: Registry) -> JobError:
    if reason == "expired":
        # The TTL the message really had, which the gateway that published it chose.
        expiration_ms = death.get("original-expiration")
        if expiration_ms is not None:
            limit_s = int(expiration_ms) // 1000
        else:
            spec = registry.get(job.params.model)
            limit_s = spec.max_queue_s if spec is not None else 0
        return errors.expired(job.params.model, limit_s)
    if reason == "delivery_limit":
        return errors.worker_crashed()
    return errors.dead_lettered(reason)


def _ended_by_an_earlier_try(record: JobRecord, error: JobError) -> bool:
    """The record ends with this very failure: most likely an earlier try of this message wrote it,
    and its publish (or what came after) failed, so the message came back (or a worker failed the
    job with the same expiry just before the check came). Its event goes out again: a subscriber
    may get it twice, with one `seq` (streams skip it, webhook receivers know the `webhook-id`)."""
    return record.status == JobStatus.FAILED and record.error == error


def dead_letter_handler(store: ObjectStore, broker: GatewayBroker, registry: Registry) -> DeadLetterHandler:
    async def handle(job: JobMessage, reason: str, death: dict[str, Any]) -> None:
        error = explain(job, reason, death, registry)
        try:  # its message has left the queue: no worker will drop it
            await broker.publish_dropped(job)
        except Exception as exc:
            log.warning("dropped_notice_not_sent", job_id=job.job_id, error=str(exc))

        def fail(record: JobRecord) -> JobRecord | None:
            return (
                None
                if record.status.is_terminal
                else record.advance(status=JobStatus.FAILED, phase=Phase.FAILED, error=error)
            )

        failed, changed = await store.update_record(job.job_id, fail)
        if failed is None or not (changed or _ended_by_an_earlier_try(failed, error)):
            return
        await broker.publish_end(JobEvent.from_record(failed))
        log.warning("job_dead_lettered", job_id=job.job_id, reason=reason, code=error.code)

    return handle


def expiry_handler(store: ObjectStore, broker: GatewayBroker) -> ExpiryHandler:
    async def handle(check: ExpiryCheck) -> None:
        error = (
            errors.download_expired(check.model, check.max_queue_s)
            if check.download
            else errors.expired(check.model, check.max_queue_s)
        )

        waiting = False

        def expire(record: JobRecord) -> JobRecord | None:
            # Only a job that never started expires; a running or handed-back one runs to its end.
            # The write is conditional: a worker that takes the job meanwhile wins, and it runs.
            nonlocal waiting
            waiting = record.status == JobStatus.QUEUED and not record.attempts and check.left_s > 0
            if record.status != JobStatus.QUEUED or record.attempts or waiting:
                return None
            return record.advance(status=JobStatus.FAILED, phase=Phase.FAILED, error=error)

        expired, changed = await store.update_record(check.job_id, expire)
        if waiting:  # the check waited in the longest delay queue that fitted: round again for the rest
            await broker.publish_check(check, check.left_s)
            return
        if expired is None or not (changed or (expired.attempts == 0 and _ended_by_an_earlier_try(expired, error))):
            return
        await broker.publish_end(JobEvent.from_record(expired))
        # A worker that receives the job later drops it, as it does a cancelled one.
        await broker.publish_cancel(check.job_id)
        log.warning("job_expired", job_id=check.job_id, max_queue_s=check.max_queue_s)

    return handle
