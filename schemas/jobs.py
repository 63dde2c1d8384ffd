"""Job state as stored in the object store and shown by the API."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

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
GENERATION_MODES: tuple[GenerationMode, ...] = ("text-to-video", "image-to-video", "video-to-video")


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


class DownloadParams(BaseModel):
    """A model download job: fetch the model's weights into the shared Hugging Face cache."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    repo: str | None
    revision: str | None = None


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


class JobRecord(BaseModel):
    """The durable state of one job (`jobs/<job_id>/job.json` in the bucket)."""

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
