"""Error codes a job can end with, and their messages, in one place for gateway and worker."""

from __future__ import annotations

from schemas.jobs import JobError


def shown(value: str, limit: int = 80) -> str:
    """A client's value quoted in an error message: whole if short, else its start and length."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


def expired(model_id: str, max_queue_s: int) -> JobError:
    return JobError(
        code="expired",
        message=f"no worker took the job within the model's maximum queue time "
        f"({max_queue_s} s); no worker may be serving {model_id!r}",
    )


def download_expired(model_id: str, max_queue_s: int) -> JobError:
    return JobError(
        code="expired",
        message=f"no worker took the download of {model_id!r} within the gateway's maximum queue "
        f"time for downloads ({max_queue_s} s); no worker may be running",
    )


def worker_crashed() -> JobError:
    return JobError(
        code="worker_crashed",
        message="the job was handed to workers repeatedly and none finished it "
        "(they crashed or were stopped while running it, or handed it back while the object store "
        "or the broker did not answer)",
    )


def dead_lettered(reason: str) -> JobError:
    return JobError(code="dead_lettered", message=f"the broker dead-lettered the job ({reason})")


def out_of_memory(width: int, height: int, frames: int, detail: str) -> JobError:
    return JobError(
        code="out_of_memory",
        message=(
            f"the GPU ran out of memory generating {width}x{height}x{frames}; try fewer frames or a smaller size, "
            f"or run the model on a worker with more GPU memory ({(detail.splitlines() or ['no detail'])[0]})"
        ),
    )


def does_not_fit(detail: str) -> JobError:
    return JobError(code="does_not_fit", message=f"the job cannot fit this worker's GPU: {detail}")
