"""A throwaway stack for the service benchmarks: its own S3 store, the broker, a gateway, workers.

Everything runs as real processes (the same ones `scripts/stack` starts) in a broker namespace of
its own, which is deleted afterwards. RabbitMQ must answer at VIDEOGEN_AMQP_URL (default local).
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from schemas.registry import load_registry  # noqa: E402
from scripts import devstack  # noqa: E402

TOKEN = "vg_bench-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# The benchmark model: the tiny LTX weights, a queue deep enough for any run, no expiry.
BENCH_MODELS = {
    "ltx-tiny": {"max_queue_depth": 10_000_000, "max_queue_s": 86_400},
}


@dataclass
class BenchStack:
    env: dict[str, str]
    logs: Path
    gateway_url: str = ""
    procs: list[subprocess.Popen] = field(default_factory=list)
    workers: list[subprocess.Popen] = field(default_factory=list)

    def start_gateway(self, name: str = "gateway", **env: str) -> str:
        port = devstack.free_port_block(1)
        proc = devstack.start_gateway(dict(self.env, **env), port, self.logs / f"{name}.log")
        self.procs.append(proc)
        return f"http://127.0.0.1:{port}"

    def start_worker(self, name: str, models: list[str], **env: str) -> subprocess.Popen:
        port = devstack.free_port_block(1)
        proc = devstack.start_worker(
            dict(self.env, VIDEOGEN_WORKER_ID=name, **env), models, port, self.logs / f"{name}.log"
        )
        self.procs.append(proc)
        self.workers.append(proc)
        return proc

    def stop_workers(self) -> None:
        for proc in self.workers:
            devstack.stop_pid(proc.pid)
        self.procs = [p for p in self.procs if p not in self.workers]
        self.workers = []


@contextmanager
def bench_stack(quota: int | str = 10_000_000, rate: str = "1000000/second") -> Iterator[BenchStack]:
    """A throwaway stack with one API key (`quota`: its max_concurrent_jobs, or "unlimited")."""
    amqp_url = os.environ.get("VIDEOGEN_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    if not devstack.amqp_answers(amqp_url):
        raise SystemExit(f"RabbitMQ does not answer at {amqp_url}")
    base = Path(tempfile.mkdtemp(prefix="videogen-bench-"))
    ports = devstack.free_port_block(11)
    weed, store = devstack.start_weed(base / "weed", ports + 10, ports, "bench", "bench-secret-123", "bench")
    models_dir = base / "models"
    devstack.build_tiny_models(models_dir)
    keys = base / "api-keys.toml"
    devstack.write_api_keys(keys, {"bench": {"token": TOKEN, "rate_limit": rate, "max_concurrent_jobs": quota}})
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    env = devstack.service_env(
        store,
        amqp_url,
        namespace,
        models_dir,
        VIDEOGEN_API_KEYS_FILE=str(keys),
        VIDEOGEN_S3_PUBLIC_ENDPOINT=f"http://{store.endpoint}",
        VIDEOGEN_LOG_LEVEL="WARNING",
        VIDEOGEN_MODEL_OVERRIDES=json.dumps(BENCH_MODELS),
        VIDEOGEN_DEFAULT_MODEL="ltx-tiny",
    )
    stack = BenchStack(env=env, logs=base / "logs")
    stack.logs.mkdir()
    try:
        stack.gateway_url = stack.start_gateway()
        yield stack
    finally:
        for proc in reversed(stack.procs):
            devstack.stop_pid(proc.pid)
        devstack.stop_pid(weed.pid)
        asyncio.run(devstack.delete_namespace(amqp_url, namespace, list(load_registry(overrides=BENCH_MODELS).models)))
        shutil.rmtree(base, ignore_errors=True)


def percentiles(values: list[float]) -> dict[str, float]:
    """p50, p95, p99 and max, in milliseconds (values in seconds)."""
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)

    return {
        "p50_ms": at(0.50),
        "p95_ms": at(0.95),
        "p99_ms": at(0.99),
        "max_ms": round(ordered[-1] * 1000, 2),
        "mean_ms": round(statistics.fmean(ordered) * 1000, 2),
    }


def machine() -> dict[str, Any]:
    return {
        "machine": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


def write_result(path: str, result: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
