"""Shared fixtures: a real S3 store (SeaweedFS), the real RabbitMQ, tiny models, real processes."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from common.logs import configure_logging
from schemas.registry import load_registry
from scripts import devstack
from scripts.devstack import S3Store
from tests.helpers import TOKENS
from worker.tiny_models import build_tiny_ltx

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Code the tests run in-process logs as the processes do (key=value lines, tracebacks without locals).
configure_logging("INFO", "console")

# Models only the tests use (VIDEOGEN_MODEL_OVERRIDES of every process the tests start).
EXTRA_MODELS = {
    # A tiny LTX pipeline with a deeper, wider transformer: slow enough (~0.1 s a step at 256x256x65
    # here) for tests that act while a job runs (cancel, reconnect, gateway restart).
    "ltx-slow": {
        "family": "ltx",
        "path": "ltx-slow",
        "native_fps": 8,
        "modes": ["text-to-video"],
        "description": "Tiny LTX with an 8-layer transformer: slow steps for lifecycle tests.",
        "defaults": {"width": 256, "height": 256, "num_frames": 65, "num_inference_steps": 20, "guidance_scale": 1.0},
        "limits": {"min_size": 32, "max_width": 256, "max_height": 256, "max_frames": 65, "max_steps": 200},
    },
    # The tiny LTX weights with every speed feature on: compiled blocks warmed up at start, an
    # attention backend, and a fast tier (TaylorSeer lite).
    "ltx-fast": {
        "family": "ltx",
        "path": "ltx-tiny",
        "native_fps": 8,
        "modes": ["text-to-video"],
        "description": "Tiny LTX with compile, warm-up, attention backend and a fast tier.",
        "defaults": {"width": 32, "height": 32, "num_frames": 9, "num_inference_steps": 4, "guidance_scale": 1.0},
        "limits": {"min_size": 32, "max_width": 256, "max_height": 256, "max_frames": 65, "max_steps": 20},
        "speed": {
            "compile": True,
            "warmup": [[32, 32, 9]],
            "attention_backend": "native",
            # TaylorSeer lite as the real models have it: a 4-step job skips the blocks on its last step.
            "fast": {
                "cache": "taylorseer",
                "options": {"use_lite_mode": True, "cache_interval": 5, "disable_cache_before_step": 3},
            },
        },
    },
    # The tiny LTX weights run as a step-distilled checkpoint: a fixed schedule through LTXConditionPipeline.
    "ltx-tiny-distilled": {
        "family": "ltx",
        "path": "ltx-tiny",
        "pipeline": "LTXConditionPipeline",
        "native_fps": 8,
        "modes": ["text-to-video"],
        "description": "Tiny LTX with a distilled checkpoint's fixed three-step schedule.",
        "defaults": {"width": 32, "height": 32, "num_frames": 9, "num_inference_steps": 3, "guidance_scale": 1.0},
        "limits": {"min_size": 32, "max_width": 256, "max_height": 256, "max_frames": 65, "max_steps": 3},
        "call_args": {"timesteps": [1000, 600, 200], "decode_timestep": 0.05, "decode_noise_scale": 0.025},
    },
    # The tiny LTX weights with a cost model scaled so that tiny sizes need the memory plans that
    # real sizes need on real GPUs: resident at 80 GiB, VAE tiling at 12, refused when huge.
    "ltx-costed": {
        "family": "ltx",
        "path": "ltx-tiny",
        "native_fps": 8,
        "modes": ["text-to-video"],
        "description": "Tiny LTX with a cost model for preflight tests.",
        "defaults": {"width": 64, "height": 64, "num_frames": 17, "num_inference_steps": 2, "guidance_scale": 1.0},
        "limits": {"min_size": 32, "max_width": 256, "max_height": 256, "max_frames": 65, "max_steps": 20},
        "cost": {
            "reference_gpu": "test",
            "denoiser_gib": 1.0,
            "text_encoder_gib": 1.0,
            "encode_gib": 0.1,
            "decode_gib_per_mpx": 200.0,
            "tiled_decode_gib_per_frame": 0.05,
            "tiled_decode_gib_per_frame_mpx": 1500.0,
            "step_s": [0.01, 0.0, 0.0],
            "decode_s_base": 0.1,
        },
    },
}


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    """The broker at VIDEOGEN_TEST_AMQP_URL (default: local 5672), else a private node started here."""
    url = os.environ.get("VIDEOGEN_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    if devstack.amqp_answers(url):
        yield url
        return
    url = f"amqp://guest:guest@127.0.0.1:{devstack.free_port_block(1)}/"
    # Not under pytest's tmp dir: the broker may run as the `rabbitmq` user, which cannot enter it.
    base = Path(tempfile.mkdtemp(prefix="videogen-rabbitmq-"))
    node = devstack.start_rabbit_node(url, base)
    yield url
    devstack.stop_rabbit_node(node)
    shutil.rmtree(base, ignore_errors=True)


async def delete_test_namespace(amqp_url: str, ns: str) -> None:
    """Delete a namespace the tests made: queues of every model the tests know, and the exchanges."""
    await devstack.delete_namespace(amqp_url, ns, list(load_registry(overrides=EXTRA_MODELS).models))


@pytest.fixture(scope="session")
def namespace(amqp_url: str) -> Iterator[str]:
    """A broker namespace of this run's own, so a running local stack never sees test jobs."""
    ns = f"test-{uuid.uuid4().hex[:10]}"
    yield ns
    asyncio.run(delete_test_namespace(amqp_url, ns))


@pytest.fixture
async def closed_stores(monkeypatch: pytest.MonkeyPatch):
    """Closes the object-store clients (`ObjectStore`) a test makes, with their connections, when it ends."""
    from common.store import ObjectStore

    made, init = [], ObjectStore.__init__

    def recording(self, *args, **kwargs) -> None:
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(ObjectStore, "__init__", recording)
    yield
    for store in made:
        await store.close()


@pytest.fixture(scope="session")
def s3_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Store]:
    base = devstack.free_port_block(10)
    proc, store = devstack.start_weed(
        tmp_path_factory.mktemp("weed"), base + 6, base, "test-access", "test-secret-key-123", "videogen-test"
    )
    yield store
    devstack.stop_pid(proc.pid)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    devstack.build_tiny_models(root)
    build_tiny_ltx(root / "ltx-slow", num_layers=8, num_heads=8, head_dim=32)
    return root


@dataclass
class Stack:
    """Real gateway and worker processes on free ports, and how to start more of them."""

    env: dict[str, str]
    logs: Path
    gateway_url: str = ""
    worker_health_url: str = ""  # the LTX worker
    wan_worker_health_url: str = ""
    slow_worker_health_url: str = ""
    procs: list[subprocess.Popen] = field(default_factory=list)
    workers: dict[str, subprocess.Popen] = field(default_factory=dict)  # worker id -> process
    shared_workers: list[subprocess.Popen] = field(default_factory=list)

    def start_gateway(self, name: str, wait_for: str = "/ready", **env: str) -> tuple[str, subprocess.Popen]:
        port = devstack.free_port_block(1)
        proc = devstack.start_gateway(dict(self.env, **env), port, self.logs / f"{name}.log", wait_for)
        self.procs.append(proc)
        return f"http://127.0.0.1:{port}", proc

    def start_worker(self, name: str, models: list[str], **env: str) -> tuple[str, subprocess.Popen]:
        port = devstack.free_port_block(1)
        env = dict(self.env, **{"VIDEOGEN_WORKER_ID": name, **env})
        proc = devstack.start_worker(env, models, port, self.logs / f"{name}.log")
        self.procs.append(proc)
        self.workers[env["VIDEOGEN_WORKER_ID"]] = proc
        if all(env[k] == self.env[k] for k in ("VIDEOGEN_AMQP_URL", "VIDEOGEN_BROKER_NAMESPACE")):
            self.shared_workers.append(proc)
        return f"http://127.0.0.1:{port}", proc

    def live_workers(self) -> int:
        """Workers alive on the stack's own broker and namespace (tests may start others elsewhere)."""
        return sum(proc.poll() is None for proc in self.shared_workers)

    def stop_all(self) -> None:
        devstack.stop_pids([proc.pid for proc in self.procs])


@pytest.fixture(scope="session")
def stack(
    s3_store: S3Store, amqp_url: str, namespace: str, models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    keys_file = tmp_path_factory.mktemp("keys") / "api-keys.toml"
    devstack.write_api_keys(
        keys_file,
        {
            "tester": {
                "token": TOKENS["tester"],
                "admin": True,
                "rate_limit": "1000/second",
                "max_concurrent_jobs": 100,
            },
            "other": {"token": TOKENS["other"]},
            "limited": {"token": TOKENS["limited"], "rate_limit": "5/second"},
            "limited-openai": {"token": TOKENS["limited-openai"], "rate_limit": "5/second"},
            "quota2": {"token": TOKENS["quota2"], "rate_limit": "1000/second", "max_concurrent_jobs": 2},
        },
    )
    env = devstack.service_env(
        s3_store,
        amqp_url,
        namespace,
        models_dir,
        VIDEOGEN_DEFAULT_MODEL="ltx-tiny",
        VIDEOGEN_API_KEYS_FILE=str(keys_file),
        VIDEOGEN_S3_PUBLIC_ENDPOINT=f"http://{s3_store.endpoint}",
        VIDEOGEN_MODEL_OVERRIDES=json.dumps(EXTRA_MODELS),
    )
    running = Stack(env=env, logs=tmp_path_factory.mktemp("logs"))
    try:
        running.gateway_url, _ = running.start_gateway("gateway")
        running.worker_health_url, _ = running.start_worker("worker-ltx", ["ltx-tiny"], VIDEOGEN_WORKER_ID="worker-ltx")
        running.wan_worker_health_url, _ = running.start_worker(
            "worker-wan", ["wan-tiny", "wan-i2v-tiny"], VIDEOGEN_WORKER_ID="worker-wan"
        )
        # Strict priorities: the lifecycle tests' order of jobs must not depend on how many jobs
        # this worker took before (test_lifecycle.py tests the lower priorities' turns apart).
        running.slow_worker_health_url, _ = running.start_worker(
            "worker-slow", ["ltx-slow"], VIDEOGEN_WORKER_ID="worker-slow", VIDEOGEN_LOWER_PRIORITY_EVERY="0"
        )
        yield running
    finally:
        running.stop_all()
