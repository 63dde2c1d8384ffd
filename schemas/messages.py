"""Versioned envelopes on the wire. Every message body is one of these, as JSON."""

from __future__ import annotations

import random
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from schemas.jobs import DownloadParams, EventEntry, GenerationParams, JobRecord, JobStatus, Mode, Priority, utcnow

SCHEMA_VERSION = 1


def new_id() -> str:
    """A message id: 128 random bits as hex. From `random` (reseeded in each forked process), not
    the system's: it names a message and guards nothing, and the system call behind uuid4 took
    about 5 % of the gateway's busy time under load in a profile."""
    return f"{random.getrandbits(128):032x}"


class EnvelopeHeader(BaseModel):
    """What every message has: its kind (`type`, set by each subclass), version, id and time."""

    schema_version: Literal[1] = SCHEMA_VERSION
    message_id: str = Field(default_factory=new_id)
    timestamp: datetime = Field(default_factory=utcnow)


class JobMessage(EnvelopeHeader):
    """Gateway → worker: run this job. Published persistent to the jobs exchange."""

    type: Literal["job.submit"] = "job.submit"
    job_id: str
    mode: Mode
    params: GenerationParams | DownloadParams
    inputs: dict[str, str] = Field(default_factory=dict, description="Input name → object key in the store.")


class JobEvent(EnvelopeHeader, EventEntry):
    """Worker (or gateway) → everyone: a job's state changed.

    `seq` increases by one per event of a job. Terminal events carry the final record.
    """

    type: Literal["job.event"] = "job.event"
    job_id: str
    owner: str | None = None  # the job's API key id, so streams of "all my jobs" can filter
    job: JobRecord | None = None

    @classmethod
    def from_entry(cls, job_id: str, entry: EventEntry, record: JobRecord) -> JobEvent:
        """The record is attached when the entry is terminal (the final state)."""
        return cls(
            job_id=job_id, **entry.model_dump(), owner=record.owner, job=record if entry.status.is_terminal else None
        )

    @classmethod
    def from_record(cls, record: JobRecord) -> JobEvent:
        """The record's latest event."""
        return cls.from_entry(record.job_id, record.last_event(), record)


class CancelMessage(EnvelopeHeader):
    """Gateway → every worker (control exchange): stop this job if you run it; drop it if it arrives."""

    type: Literal["job.cancel"] = "job.cancel"
    job_id: str


class JobAvailable(EnvelopeHeader):
    """Gateway → every worker (control exchange): a job was just queued for this model.

    Idle workers serving the model look at its queues at once instead of at their next poll.
    Best effort: a worker that misses it still finds the job when it polls.
    """

    type: Literal["job.available"] = "job.available"
    model: str


class JobDropped(EnvelopeHeader):
    """Worker → gateways (events exchange, `dropped.<job_id>`): this worker took the message of a
    job that ended before any worker started it (cancelled or expired while queued) off its queue.

    Gateways do not count such messages as waiting jobs (`queue_depth`, `queue_position`,
    `max_queue_depth`) while they sit in a queue; this notice tells them one has left.
    """

    type: Literal["job.dropped"] = "job.dropped"
    job_id: str
    model: str
    priority: Priority


def left_in_queue(record: JobRecord) -> bool:
    """Whether this ended job's message went into a model's queue and no worker took it to run:
    a generation job without an attempt, cancelled or expired (the other ends without an attempt
    come from a job whose message never reached a queue, or left it dead-lettered). A worker
    sends JobDropped for such a job when it takes the message off its queue."""
    if record.mode == "download" or record.attempts or not isinstance(record.params, GenerationParams):
        return False
    expired = record.status == JobStatus.FAILED and record.error is not None and record.error.code == "expired"
    return record.status == JobStatus.CANCELLED or expired


class ExpiryCheck(EnvelopeHeader):
    """Gateway → itself, delayed by the model's max_queue_s (a download's: the gateway's
    download_max_queue_s): fail the job if it still has not started."""

    type: Literal["job.expiry_check"] = "job.expiry_check"
    job_id: str
    model: str
    max_queue_s: int
    download: bool = False
    # Seconds still to wait once this round falls due: a check waits in the longest delay queue
    # that fits its time and goes round again for the rest (0: due now; checks of earlier versions).
    left_s: int = Field(default=0, ge=0)


Message = JobMessage | JobEvent | CancelMessage | JobAvailable | JobDropped | ExpiryCheck
_envelope = TypeAdapter(Annotated[Message, Field(discriminator="type")])


class DecodeError(ValueError):
    """A message body that is not a valid envelope of a known version; keeps the raw bytes."""

    def __init__(self, raw: bytes, reason: str) -> None:
        super().__init__(reason)
        self.raw = raw
        self.reason = reason


def decode(raw: bytes) -> Message:
    try:
        return _envelope.validate_json(raw)
    except ValidationError as exc:
        raise DecodeError(raw, _summarise(exc)) from exc


def encode(message: BaseModel) -> bytes:
    return message.model_dump_json(exclude_none=False).encode()


def _summarise(exc: ValidationError) -> str:
    first = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in first["loc"]) or "body"
    return f"{where}: {first['msg']} ({exc.error_count()} error(s))"
