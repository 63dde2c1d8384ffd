"""Prometheus metrics of a worker, at `GET /metrics` on its health port."""

from __future__ import annotations

import torch
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

from schemas.jobs import JobRecord

JOBS = Counter("videogen_worker_jobs_total", "Jobs this worker ended, by outcome", ["model", "status"])
PHASE_SECONDS = Histogram(
    "videogen_worker_phase_seconds",
    "Seconds per phase of the jobs this worker ran to success",
    ["model", "phase"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900),
)
BUSY = Gauge(
    "videogen_worker_busy", "1 from taking a generation job until its frames are generated (the GPU's part), else 0"
)
RUNNING = Gauge(
    "videogen_worker_running",
    "Jobs this worker is running, by model: 0, 1, or 2 while one is encoded and uploaded as the next generates",
    ["model"],
)
GPU_MEMORY = Gauge(
    "videogen_gpu_memory_bytes", "GPU memory held by tensors (in_use) and its peak since start", ["kind"]
)


def job_ended(record: JobRecord) -> None:
    JOBS.labels(record.model, record.status.value).inc()
    if record.timings is not None and record.status.value == "succeeded":
        for phase, seconds in record.timings.model_dump().items():
            if seconds is not None:
                PHASE_SECONDS.labels(record.model, phase).observe(seconds)


def render(devices: set[torch.device]) -> web.Response:
    """The metrics page; GPU memory is summed over the CUDA devices the worker's models run on."""
    cuda = [d for d in devices if d.type == "cuda"]
    if cuda:
        GPU_MEMORY.labels("in_use").set(sum(torch.cuda.memory_allocated(d) for d in cuda))
        GPU_MEMORY.labels("peak").set(sum(torch.cuda.max_memory_allocated(d) for d in cuda))
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})
