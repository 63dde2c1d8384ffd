"""Speed features on a real worker: compiled blocks warmed up before the worker is ready, the fast
tier (a diffusers cache, fresh per job), and a step-distilled checkpoint's fixed schedule."""

from __future__ import annotations

import json

import pytest

from tests.helpers import client, submit, watch


@pytest.fixture
async def http():
    async with client() as session:
        yield session


@pytest.fixture(scope="module")
def speed_worker(stack, namespace):
    name = f"worker-speed-{namespace}"
    health, _ = stack.start_worker(name, ["ltx-fast", "ltx-tiny-distilled"])
    return stack.logs / f"{name}.log"


def log_events(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


async def test_compiled_blocks_are_warmed_up_before_the_worker_is_ready(stack, http, speed_worker) -> None:
    events = log_events(speed_worker)
    names = [e["event"] for e in events]
    warmup = next(e for e in events if e["event"] == "warmup_done")
    assert warmup["model"] == "ltx-fast" and warmup["buckets"] == 1 and warmup["tiers"] == ["standard", "fast"]
    assert names.index("warmup_done") < names.index("worker_started")


async def test_fast_and_standard_tiers_each_run_every_step(stack, http, speed_worker) -> None:
    body = {"prompt": "tiers", "model": "ltx-fast", "seed": 3}
    jobs = [await submit(http, stack.gateway_url, body | {"tier": tier}) for tier in ("fast", "standard", "fast")]
    assert [j["request"]["tier"] for j in jobs] == ["fast", "standard", "fast"]
    for job in jobs:
        frames = await watch(http, stack.gateway_url, job["job_id"], timeout=120)
        assert frames[-1]["status"] == "succeeded", frames[-1]
        assert [f["step"] for f in frames if f["phase"] == "denoising"] == [1, 2, 3, 4]
    # The worker logs no cache left on from one job to the next: each fast job starts a fresh one.
    assert not [e for e in log_events(speed_worker) if e.get("event") == "job_interrupted"]


async def test_a_model_without_a_fast_tier_refuses_it(stack, http) -> None:
    async with http.post(
        f"{stack.gateway_url}/api/v1/generate/text-to-video", json={"prompt": "x", "model": "ltx-tiny", "tier": "fast"}
    ) as response:
        body = await response.json()
    assert response.status == 422
    assert (body["error"]["details"][0]["field"], body["error"]["details"][0]["rule"]) == (
        "tier",
        "fast_tier_available",
    )


async def test_a_distilled_checkpoint_runs_its_own_schedule(stack, http, speed_worker) -> None:
    accepted = await submit(http, stack.gateway_url, {"prompt": "few steps", "model": "ltx-tiny-distilled"})
    assert accepted["request"]["num_inference_steps"] == 3 and accepted["request"]["guidance_scale"] == 1.0
    frames = await watch(http, stack.gateway_url, accepted["job_id"], timeout=120)
    assert frames[-1]["status"] == "succeeded", frames[-1]
    assert [(f["step"], f["total_steps"]) for f in frames if f["phase"] == "denoising"] == [(1, 3), (2, 3), (3, 3)]
    async with http.post(
        f"{stack.gateway_url}/api/v1/generate/text-to-video",
        json={"prompt": "x", "model": "ltx-tiny-distilled", "num_inference_steps": 8},
    ) as response:
        body = await response.json()
    assert response.status == 422 and body["error"]["details"][0]["rule"] == "fixed_by_model"
