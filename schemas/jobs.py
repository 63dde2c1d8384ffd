"""Job state as stored in the object store and shown by the API."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.cost import Estimate, MemoryPlan

RECORD_SCHEMA_VERSION = 1


def utcnow() -> datetime:
    return datetime.now(UTC)


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


class Phase(StrEnum):
    """Finer-grained than status: where a running job is in its life."""

    QUEUED = "queued"
    LOADING = "loading"
    DENOISING = "denoising"
    DOWNLOADING = "downloading"
    DECODING = "decoding"
    ENCODING = "encoding"
    UPLOADING = "uploading"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


Mode = Literal["text-to-video", "image-to-video", "video-to-video", "download"]
GenerationMode = Literal["text-to-video", "image-to-video", "video-to-video"]
Priority = Literal["high", "normal", "low"]
Tier = Literal["standard", "fast"]
# Highest first: the order in which workers take jobs.
PRIORITIES: tuple[Priority, ...] = ("high", "normal", "low")


class GenerationParams(BaseModel):
    """A request with every default resolved: exactly what the worker runs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str
    negative_prompt: str | None = None
    model: str
    num_frames: int
    width: int
    height: int
    fps: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    strength: float | None = None  # video-to-video only: how far the output may move from the input
    priority: Priority = "normal"  # which of the model's queues the job waits in
    tier: Tier = "standard"  # "fast": the model's cache acceleration (output may differ slightly)


class DownloadParams(BaseModel):
    """A model download job: fetch the model's weights into the shared Hugging Face cache."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    repo: str | None
    revision: str | None = None


WebhookEventType = Literal["job.queued", "job.running", "job.succeeded", "job.failed", "job.cancelled"]
DEFAULT_WEBHOOK_EVENTS: tuple[WebhookEventType, ...] = ("job.succeeded", "job.failed", "job.cancelled")


class Webhook(BaseModel):
    """Where to POST a job's events, and which (`job.<status>`; `job.running` is every progress event)."""

    url: str
    events: list[WebhookEventType]


class JobOutput(BaseModel):
    """The stored video; the API turns `key` into a presigned URL."""

    key: str
    content_type: str = "video/mp4"
    bytes: int
    num_frames: int
    width: int
    height: int
    fps: float


class JobError(BaseModel):
    code: str
    message: str


class PhaseSeconds(BaseModel):
    """Where a job's time went, in seconds; each is set once its phase is over."""

    queued: float | None = Field(default=None, description="Accepted → a worker started it (its last attempt).")
    load: float | None = Field(default=None, description="Started → first denoising step: inputs, prompt encoding.")
    denoise: float | None = None
    decode: float | None = Field(default=None, description="VAE decode and conversion to 8-bit frames.")
    encode: float | None = Field(default=None, description="MP4 encoding.")
    upload: float | None = Field(default=None, description="Upload of the MP4 to the object store.")


class EventEntry(BaseModel):
    """One state change of a job, as kept in its record's history and sent to clients."""

    seq: int = Field(ge=0)
    timestamp: datetime
    status: JobStatus
    phase: Phase
    progress: float = Field(ge=0.0, le=1.0)
    step: int | None = None
    total_steps: int | None = None
    eta_s: float | None = Field(default=None, description="Estimated seconds until the job ends.")
    queue_position: int | None = Field(default=None, description="Jobs ahead of this one (queued jobs).")
    message: str | None = None


# Fields of a record that each event also carries.
_EVENT_FIELDS = ("status", "phase", "progress", "step", "total_steps", "eta_s", "queue_position", "message")


class JobRecord(BaseModel):
    """The durable state of one job (`jobs/<job_id>/job.json` in the bucket), with its event history."""

    schema_version: Literal[1] = RECORD_SCHEMA_VERSION
    job_id: str
    mode: Mode
    model: str
    status: JobStatus
    phase: Phase
    progress: float = Field(ge=0.0, le=1.0)
    seq: int = Field(ge=0, description="Sequence number of the last event of this job.")
    step: int | None = None
    total_steps: int | None = None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    params: GenerationParams | DownloadParams
    inputs: dict[str, str] = Field(default_factory=dict, description="Input name → object key.")
    output: JobOutput | None = None
    error: JobError | None = None
    message: str | None = None
    attempts: int = 0
    worker: str | None = None
    eta_s: float | None = None
    queue_position: int | None = None
    webhook: Webhook | None = None
    timings: PhaseSeconds | None = None
    deleted_at: datetime | None = Field(
        default=None, description="When its video was deleted: the record stays, so a late delivery is not run."
    )
    estimate: Estimate | None = None
    memory_plan: MemoryPlan | None = None
    cancel_requested_at: datetime | None = Field(
        default=None,
        description="When a cancel was asked for while the job ran: the worker running it stops it, and a worker "
        "that gets it again (after a crash) ends it cancelled.",
    )
    owner: str | None = Field(
        default=None, description="The API key (its id) that created the job; None when the gateway runs without keys."
    )
    ended_by: str | None = Field(
        default=None,
        description="The worker that wrote the job's end (also one that ended it without starting it); None while "
        "the job runs, and when a gateway ended it.",
    )
    events: list[EventEntry] = Field(default_factory=list, description="Every event so far, by seq.")

    def advance(self, **changes: Any) -> JobRecord:
        """The next state: seq + 1, progress never lower (and to four decimals: 0.9 x 9 / 20 is
        0.405, not 0.40499999999999997), the change appended to the history."""
        now = utcnow()
        changes.setdefault("eta_s", None)  # an estimate holds only for the event that carries it
        if changes.get("status", self.status).is_terminal:
            changes.setdefault("finished_at", now)
            changes["eta_s"] = None
            changes.setdefault("queue_position", None)
        updated = self.model_copy(
            update={
                **changes,
                "seq": self.seq + 1,
                "updated_at": now,
                "progress": round(max(self.progress, changes.get("progress", self.progress)), 4),
            }
        )
        updated.events = [*self.events, updated.last_event()]
        return updated

    def last_event(self) -> EventEntry:
        return EventEntry(
            seq=self.seq, timestamp=self.updated_at, **{name: getattr(self, name) for name in _EVENT_FIELDS}
        )


class ResultView(BaseModel):
    url: str
    url_expires_at: datetime
    content_type: str
    bytes: int
    num_frames: int
    width: int
    height: int
    fps: float


class JobView(BaseModel):
    """What `GET /api/v1/jobs/{id}` returns and what a terminal event frame carries."""

    job_id: str
    mode: Mode
    model: str
    status: JobStatus
    phase: Phase
    progress: float
    seq: int
    step: int | None
    total_steps: int | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    request: GenerationParams | DownloadParams
    result: ResultView | None
    error: JobError | None
    message: str | None
    eta_s: float | None
    queue_position: int | None
    attempts: int = Field(description="How many times a worker started the job (more than 1 after a crash).")
    webhook: Webhook | None = None
    worker: str | None = Field(description="The worker that ran (or runs) the job.")
    timings: PhaseSeconds | None = Field(default=None, description="Seconds per phase, as each ends.")
    estimate: Estimate | None = Field(default=None, description="The gateway's preflight estimate.")
    memory_plan: MemoryPlan | None = Field(default=None, description="How the worker fitted the job to its GPU.")
    cancel_requested_at: datetime | None = Field(
        default=None, description="When a cancel was asked for while the job ran (it is stopping, or about to end)."
    )
