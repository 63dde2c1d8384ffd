"""What clients send. Generic bounds live here; model-specific rules live in the registry."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from schemas.jobs import GenerationParams, JobStatus

MAX_SEED = 2**32 - 1


class TextToVideoRequest(BaseModel):
    """`POST /api/v1/generate/text-to-video`. Unset fields take the model's defaults."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    prompt: str = Field(min_length=1, max_length=4000)
    negative_prompt: str | None = Field(default=None, max_length=4000)
    model: str | None = Field(default=None, min_length=1, max_length=100)
    num_frames: int | None = Field(default=None, ge=1)
    width: int | None = Field(default=None, ge=1)
    height: int | None = Field(default=None, ge=1)
    fps: int | None = Field(default=None, ge=1, le=120)
    num_inference_steps: int | None = Field(default=None, ge=1)
    guidance_scale: float | None = Field(default=None, ge=0.0, le=50.0)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)


class JobAccepted(BaseModel):
    """The 202 answer to a submission."""

    job_id: str
    status: JobStatus
    model: str
    request: GenerationParams
    links: dict[str, str]
