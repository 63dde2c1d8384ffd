"""Jobs whose message was dead-lettered end `failed`, with a code saying why."""

from __future__ import annotations

from typing import Any

import structlog

from common.store import ObjectStore
from gateway.broker import DeadLetterHandler, GatewayBroker
from schemas import errors
from schemas.jobs import JobError, JobStatus, Phase
from schemas.messages import JobEvent, JobMessage
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


def dead_letter_handler(store: ObjectStore, broker: GatewayBroker, registry: Registry) -> DeadLetterHandler:
    async def handle(job: JobMessage, reason: str, death: dict[str, Any]) -> None:
        record = await store.get_record(job.job_id)
        if record is None or record.status.is_terminal:
            return
        error = explain(job, reason, death, registry)
        failed = record.advance(status=JobStatus.FAILED, phase=Phase.FAILED, error=error)
        await store.put_record(failed)
        await broker.publish_event(JobEvent.from_record(failed))
        log.warning("job_dead_lettered", job_id=job.job_id, reason=reason, code=error.code)

    return handle
