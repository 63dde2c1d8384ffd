"""What clients send. Generic bounds live here; model-specific rules live in the registry."""

from __future__ import annotations

import unicodedata
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, field_validator
from pydantic_core import PydanticCustomError

from schemas.cost import Estimate
from schemas.jobs import DownloadParams, GenerationParams, JobStatus, Priority, Tier, WebhookEventType

MAX_SEED = 2**32 - 1
# Control characters a prompt may hold: tab and line breaks.
_ALLOWED_CONTROLS = {"\t", "\n", "\r"}


def refuse_controls(value: Any) -> Any:
    """No control characters but tab and line breaks in a text, checked before it is stripped
    (U+0085, U+000B and U+000C count as whitespace there): one at either end is refused too, not
    stripped away."""
    if not isinstance(value, str):
        return value
    controls = sorted({c for c in value if unicodedata.category(c) == "Cc" and c not in _ALLOWED_CONTROLS})
    if controls:
        raise PydanticCustomError(
            "control_characters",
            "no control characters but tab and line breaks; found {found}",
            {"found": ", ".join(f"U+{ord(c):04X}" for c in controls)},
        )
    return value


def check_prompt_text(value: str | None, visible: bool = True) -> str | None:
    """A prompt's text: no control characters but tab and line breaks (`refuse_controls`, which
    runs before stripping as well), and (`visible`) at least one character that shows (a prompt
    of only zero-width or other format characters says nothing to the model, as one of only
    spaces)."""
    if value is None:
        return value
    refuse_controls(value)
    if visible and value and all(c.isspace() or unicodedata.category(c) in ("Cf", "Cc") for c in value):
        raise PydanticCustomError("visible_text", "at least one visible character; only invisible ones were sent")
    return value


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
    priority: Priority | None = Field(
        default=None, description="high, normal (the default) or low: queued jobs of higher priority are run first."
    )
    tier: Tier | None = Field(
        default=None, description="standard (the default) or fast: the model's cache acceleration, if it has one."
    )
    webhook_url: HttpUrl | None = Field(
        default=None, description="Receives the job's events, signed (Standard Webhooks)."
    )
    webhook_events: list[WebhookEventType] | None = Field(
        default=None,
        min_length=1,
        description="Which events to send; default: the terminal ones. Also one comma-separated string.",
        json_schema_extra=lambda schema: schema["anyOf"].insert(
            1, {"type": "string", "description": 'Comma-separated, e.g. "job.running,job.succeeded".'}
        ),
    )

    @field_validator("prompt", "negative_prompt", mode="before")
    @classmethod
    def _no_controls(cls, value: Any) -> Any:
        return refuse_controls(value)

    @field_validator("prompt")
    @classmethod
    def _prompt_text(cls, value: str) -> str:
        return check_prompt_text(value)

    @field_validator("negative_prompt")
    @classmethod
    def _negative_prompt_text(cls, value: str | None) -> str | None:
        """Empty once stripped (or sent empty) means none: recorded as null, as when absent."""
        return check_prompt_text(value, visible=False) or None

    @field_validator("priority", "tier", "webhook_url", mode="before")
    @classmethod
    def _strip(cls, value: Any) -> Any:
        """Stripped like the other strings (`str_strip_whitespace` passes over choices and URLs)."""
        return value.strip() if isinstance(value, str) else value

    @field_validator("webhook_events", mode="before")
    @classmethod
    def _split_events(cls, value: Any) -> Any:
        """Multipart forms send lists comma-separated; an empty item is refused, not dropped."""
        return [v.strip() for v in value.split(",")] if isinstance(value, str) else value

    @field_validator("webhook_events")
    @classmethod
    def _each_event_once(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) != len(value):
            repeated = sorted({v for v in value if value.count(v) > 1})
            raise PydanticCustomError(
                "unique", "each event type at most once; repeated: {repeated}", {"repeated": ", ".join(repeated)}
            )
        return value


class ImageToVideoRequest(TextToVideoRequest):
    """`POST /api/v1/generate/image-to-video`: JSON with a base64 `image`, or multipart with an `image` file."""

    image: str | None = Field(
        default=None, min_length=1, description="Base64-encoded PNG, JPEG or WebP (JSON requests)."
    )


class VideoToVideoRequest(TextToVideoRequest):
    """`POST /api/v1/generate/video-to-video`: multipart with a `video` file, or JSON with a base64 `video`."""

    video: str | None = Field(default=None, min_length=1, description="Base64-encoded video (JSON requests).")
    strength: float | None = Field(default=None, gt=0.0, le=1.0)


class DownloadRequest(BaseModel):
    """`POST /api/v1/models/download`."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=100)


class JobAccepted(BaseModel):
    """The 202 answer to a submission."""

    job_id: str
    status: JobStatus
    model: str
    mode: str
    request: GenerationParams | DownloadParams
    workers: int | None = Field(
        description="Workers consuming this model's queue right now (0: none yet; null: the broker could not be asked)."
    )
    queue_depth: int | None = Field(
        description="Jobs in this model's queue not yet handed to a worker, this one included."
    )
    queue_position: int | None = Field(
        description="Jobs ahead of this one when it was queued: those waiting "
        "for the same model at the same or a higher priority."
    )
    estimate: Estimate | None = Field(
        default=None, description="Preflight: peak GPU memory, seconds and memory plan (null: no cost model)."
    )
    links: dict[str, str]
