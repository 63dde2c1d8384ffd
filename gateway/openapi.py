"""The OpenAPI 3.1 document of the gateway, generated from the pydantic models (`GET /openapi.json`).

Request bodies come from the request models (validation mode), responses from the response models
(serialization mode); pydantic's JSON Schema is JSON Schema 2020-12, which OpenAPI 3.1 uses as is.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from gateway.handlers import MODES
from schemas.api import ErrorResponse, Health, JobList, ModelInfo, ModelList, Readiness
from schemas.jobs import JobStatus, JobView
from schemas.requests import DownloadRequest, JobAccepted

REF = "#/components/schemas/{model}"
JSON = "application/json"

# What each error status means on this API; every one has the ErrorResponse body.
ERRORS = {
    "400": "Malformed request (body not JSON, bad multipart, bad header or query parameter).",
    "401": "No API key, or an unknown one (`unauthorized`).",
    "403": "The API key may not do this (`forbidden`).",
    "404": "No such job, or not this key's (`job_not_found`); unknown model (`model_not_found`).",
    "409": "Conflict: the job already ended, it cannot be cancelled, or an Idempotency-Key is in use.",
    "413": "Body or upload over the size limit (`body_too_large`).",
    "415": "Unsupported content type or media format.",
    "422": "A field broke a rule; `details` name the field and the rule (`validation_error`).",
    "429": "Over the key's rate limit (`rate_limited`) or concurrent-job quota (`quota_exceeded`); see Retry-After.",
    "503": "Queue full (`queue_full`), uploads busy (`uploads_busy`), the broker or object store unavailable, or a job record that kept changing (`record_busy`); see Retry-After.",
    "504": "The request took longer than the gateway's request timeout (`timeout`).",
}
AUTHED = ("401", "429", "504")


def build_openapi(version: str = "0.1.0") -> dict[str, Any]:
    responses: list[type[BaseModel]] = [
        ErrorResponse,
        Health,
        Readiness,
        JobAccepted,
        JobView,
        JobList,
        ModelList,
        ModelInfo,
    ]
    requests: list[type[BaseModel]] = [model for model, _ in MODES.values()] + [DownloadRequest]
    keys, defs = models_json_schema(
        [(m, "serialization") for m in responses] + [(m, "validation") for m in requests], ref_template=REF
    )

    def ref(model: type[BaseModel], mode: str = "serialization") -> dict[str, Any]:
        return keys[(model, mode)]

    def ok(model: type[BaseModel], description: str) -> dict[str, Any]:
        return {"description": description, "content": {JSON: {"schema": ref(model)}}}

    def errors(*codes: str) -> dict[str, Any]:
        return {
            code: {"description": ERRORS[code], "content": {JSON: {"schema": ref(ErrorResponse)}}}
            for code in sorted({*codes, *AUTHED})
        }

    job_id = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}}
    paths: dict[str, Any] = {
        "/health": {
            "get": {
                "operationId": "health",
                "summary": "Liveness",
                "security": [],
                "responses": {"200": ok(Health, "The process is up.")},
            }
        },
        "/ready": {
            "get": {
                "operationId": "ready",
                "summary": "Readiness: broker and store reachable",
                "security": [],
                "responses": {"200": ok(Readiness, "Ready."), "503": ok(Readiness, "Not ready.")},
            }
        },
    }
    for mode, (model, file_field) in MODES.items():
        content: dict[str, Any] = {JSON: {"schema": ref(model, "validation")}}
        if file_field is not None:
            form = dict(defs["$defs"][model.__name__])
            form["properties"] = {
                **{k: v for k, v in form["properties"].items() if k != file_field},
                file_field: {"type": "string", "format": "binary"},
            }
            form["required"] = [*form.get("required", []), file_field]
            content = {"multipart/form-data": {"schema": form}, **content}
        paths[f"/api/v1/generate/{mode}"] = {
            "post": {
                "operationId": f"generate_{mode.replace('-', '_')}",
                "summary": f"Submit a {mode} job",
                "parameters": [
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string", "minLength": 1, "maxLength": 255},
                    }
                ],
                "requestBody": {"required": True, "content": content},
                "responses": {
                    "202": ok(JobAccepted, "Accepted and queued (or an Idempotency-Key replay)."),
                    **errors("400", "409", "413", "415", "422", "503"),
                },
            }
        }
    paths["/api/v1/models"] = {
        "get": {
            "operationId": "list_models",
            "summary": "The models and their queues",
            "responses": {"200": ok(ModelList, "Every model."), **errors()},
        }
    }
    paths["/api/v1/model/info"] = {
        "get": {
            "operationId": "model_info",
            "summary": "One model (default: the default model)",
            "parameters": [{"name": "model", "in": "query", "required": False, "schema": {"type": "string"}}],
            "responses": {"200": ok(ModelInfo, "The model."), **errors("404", "422")},
        }
    }
    paths["/api/v1/models/download"] = {
        "post": {
            "operationId": "download_model",
            "summary": "Fetch a model's weights into the workers' cache (admin keys)",
            "requestBody": {"required": True, "content": {JSON: {"schema": ref(DownloadRequest, "validation")}}},
            "responses": {
                "202": ok(JobAccepted, "The download job is queued."),
                **errors("400", "403", "413", "415", "422", "503"),
            },
        }
    }
    paths["/api/v1/jobs"] = {
        "get": {
            "operationId": "list_jobs",
            "summary": "The caller's jobs, newest first",
            "parameters": [
                {
                    "name": "status",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "string", "enum": [s.value for s in JobStatus]},
                },
                {"name": "model", "in": "query", "required": False, "schema": {"type": "string"}},
                {
                    "name": "limit",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20},
                },
                {"name": "cursor", "in": "query", "required": False, "schema": {"type": "string"}},
            ],
            "responses": {"200": ok(JobList, "A page of jobs."), **errors("422", "503")},
        }
    }
    get_job = {
        "operationId": "get_job",
        "summary": "One job",
        "parameters": [job_id],
        "responses": {"200": ok(JobView, "The job."), **errors("404", "503")},
    }
    cancel = {
        "parameters": [job_id],
        "responses": {
            "200": ok(JobView, "Cancelled before it started (or it had just ended)."),
            "202": ok(
                JobView, "Running: it stops at its next denoising step (or after its decode, encoding or upload)."
            ),
            **errors("404", "409", "503"),
        },
    }
    paths["/api/v1/jobs/{job_id}"] = {
        "get": get_job,
        "delete": {"operationId": "delete_job", "summary": "Cancel a job (as POST .../cancel)", **cancel},
    }
    paths["/api/v1/job/{job_id}"] = {"get": {**get_job, "operationId": "get_job_legacy", "deprecated": True}}
    paths["/outputs/{job_id}.mp4"] = {
        "get": {
            "operationId": "job_output",
            "summary": "The job's MP4: a redirect to a fresh presigned link",
            "parameters": [job_id],
            "responses": {
                "302": {
                    "description": "`Location`: the MP4 in the object store, presigned.",
                    "headers": {"Location": {"schema": {"type": "string", "format": "uri"}}},
                },
                **errors("404", "503"),
            },
        }
    }
    paths["/api/v1/jobs/{job_id}/cancel"] = {"post": {"operationId": "cancel_job", "summary": "Cancel a job", **cancel}}
    stream_params = [
        {
            "name": "job_id",
            "in": "query",
            "required": False,
            "schema": {"type": "array", "items": {"type": "string"}},
            "style": "form",
            "explode": True,
        },
        {"name": "all", "in": "query", "required": False, "schema": {"type": "boolean"}},
        {"name": "since", "in": "query", "required": False, "schema": {"type": "integer"}},
        {
            "name": "access_token",
            "in": "query",
            "required": False,
            "schema": {"type": "string"},
            "description": "The API key, for clients that cannot send headers.",
        },
    ]
    paths["/api/v1/ws"] = {
        "get": {
            "operationId": "job_events_ws",
            "summary": "Job events over WebSocket (history, then live)",
            "parameters": stream_params,
            "responses": {
                "101": {"description": "Switching to WebSocket; one JSON frame per event."},
                **errors("400", "404", "422", "503"),
            },
        }
    }
    paths["/api/v1/events"] = {
        "get": {
            "operationId": "job_events_sse",
            "summary": "Job events as Server-Sent Events",
            "parameters": [
                *stream_params,
                {"name": "Last-Event-ID", "in": "header", "required": False, "schema": {"type": "string"}},
            ],
            "responses": {
                "200": {
                    "description": "`text/event-stream`: `event: job.event`, `id: <job_id>:<seq>` (several jobs: "
                    "`seqs:<s1>,<s2>,...`, each job's last seq sent).",
                    "content": {"text/event-stream": {"schema": {"type": "string"}}},
                },
                "204": {
                    "description": "Resumed (`since` or `Last-Event-ID`) at or after the terminal event of "
                    "the job: nothing more will come. An EventSource stops reconnecting."
                },
                **errors("400", "404", "422", "503"),
            },
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "videogen",
            "version": version,
            "description": "Video generation jobs: submit, watch, cancel, download. See docs/API.md.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {"schemas": defs["$defs"], "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


async def openapi_document(request: web.Request) -> web.Response:
    return web.json_response(request.app[OPENAPI])


OPENAPI = web.AppKey("openapi", dict)
