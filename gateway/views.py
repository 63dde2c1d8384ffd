"""Turn stored records into what clients see: presigned links instead of object keys."""

from __future__ import annotations

from typing import Any

from common.store import ObjectStore
from schemas.jobs import JobRecord, JobView, ResultView
from schemas.messages import JobEvent


def job_view(record: JobRecord, store: ObjectStore, expiry_s: int) -> JobView:
    result = None
    if record.output is not None:
        url, expires_at = store.presign(record.output.key, expiry_s)
        out = record.output
        result = ResultView(
            url=url,
            url_expires_at=expires_at,
            content_type=out.content_type,
            bytes=out.bytes,
            num_frames=out.num_frames,
            width=out.width,
            height=out.height,
            fps=out.fps,
        )
    return JobView(
        job_id=record.job_id,
        mode=record.mode,
        model=record.model,
        status=record.status,
        phase=record.phase,
        progress=record.progress,
        seq=record.seq,
        step=record.step,
        total_steps=record.total_steps,
        created_at=record.created_at,
        updated_at=record.updated_at,
        started_at=record.started_at,
        finished_at=record.finished_at,
        request=record.params,
        result=result,
        error=record.error,
        message=record.message,
        eta_s=record.eta_s,
        queue_position=record.queue_position,
        attempts=record.attempts,
        worker=record.worker,
        timings=record.timings,
        estimate=record.estimate,
        memory_plan=record.memory_plan,
        cancel_requested_at=record.cancel_requested_at,
        webhook=record.webhook,
    )


def event_frame(event: JobEvent, store: ObjectStore, expiry_s: int) -> dict[str, Any]:
    """One WebSocket frame. A terminal event's frame carries the final job state as `job`."""
    frame = event.model_dump(mode="json", exclude={"job", "schema_version", "message_id", "owner"})
    if event.job is not None:
        frame["job"] = job_view(event.job, store, expiry_s).model_dump(mode="json")
    return frame
