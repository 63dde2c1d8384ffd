"""Response bodies of the HTTP API that are not job records: errors, listings, models, probes.

The gateway builds these responses from these models, and the OpenAPI document
(`GET /openapi.json`) is generated from them, so the two cannot drift apart.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from schemas.jobs import JobView


class ErrorDetail(BaseModel):
    field: str = Field(description="The request field (or header) at fault, dotted for nested fields.")
    rule: str = Field(description="The rule it broke, e.g. `missing`, `less_than_equal`, `size_multiple`.")
    message: str


class ErrorBody(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. `validation_error`, `job_not_found`.")
    message: str
    details: list[ErrorDetail] | None = None


class ErrorResponse(BaseModel):
    """Every 4xx and 5xx answer of the gateway."""

    error: ErrorBody


class JobList(BaseModel):
    """`GET /api/v1/jobs`: newest first."""

    jobs: list[JobView]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page.")


class ModelDescription(BaseModel):
    id: str
    family: str
    description: str
    source: dict[str, str | None] = Field(description="`repo` and `revision` (a hub model) or `path` (a local one).")
    modes: list[str]
    fast_tier_modes: list[str] = Field(
        description='The modes in which a job may ask for `"tier": "fast"`; empty when the model has no fast tier.'
    )
    native_fps: int
    defaults: dict[str, Any]
    limits: dict[str, Any]
    rules: dict[str, Any]
    max_queue_s: int
    max_queue_depth: int = Field(
        description="How many jobs may wait for the model, all priorities together, before submissions get 503 queue_full."
    )
    workers: int | None = Field(description="Workers serving the model now; null when the broker cannot be asked.")
    queue_depth: int | None = Field(description="Jobs waiting for the model, all priorities.")
    queue_depth_by_priority: dict[str, int] | None


class ModelInfo(ModelDescription):
    download_workers: int | None = Field(description="Workers taking model downloads now.")


class ModelList(BaseModel):
    default_model: str
    models: list[ModelDescription]


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready", "unavailable"]
    broker: Literal["ok", "unreachable"]
    store: Literal["ok", "unreachable"]
