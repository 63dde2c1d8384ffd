"""Preflight: the estimate (memory, seconds, plan) in the 202 and the job, refusal of what cannot
fit, and the worker fitting a job to its own GPU memory."""

from __future__ import annotations

import pytest

from tests.helpers import client, get_json, submit, watch

SMALL = {"prompt": "fits", "model": "ltx-costed", "width": 64, "height": 64, "num_frames": 17}


@pytest.fixture
async def http():
    async with client() as session:
        yield session


@pytest.fixture(scope="module")
def worker_12gib(stack, namespace):
    """The one worker for ltx-costed: it plans for 12 GiB of GPU memory."""
    stack.start_worker(f"worker-12gib-{namespace}", ["ltx-costed"], VIDEOGEN_GPU_MEMORY_GIB="12")


async def test_the_202_carries_the_estimate(stack, http, worker_12gib) -> None:
    accepted = await submit(http, stack.gateway_url, SMALL)
    estimate = accepted["estimate"]
    assert estimate["plan"] == "resident" and estimate["gpu_memory_gib"] == 80
    assert estimate["peak_gib"] == estimate["peaks_gib"]["resident"]
    assert estimate["peaks_gib"]["vae_tiling"] < estimate["peaks_gib"]["resident"]
    assert estimate["seconds"] > 0 and estimate["reference_gpu"] == "test"
    _, job = await get_json(http, f"{stack.gateway_url}/api/v1/jobs/{accepted['job_id']}")
    assert job["estimate"] == estimate
    # Models without a cost model say so.
    plain = await submit(http, stack.gateway_url, {"prompt": "x", "model": "ltx-tiny"})
    assert plain["estimate"] is None
    await watch(http, stack.gateway_url, [accepted["job_id"], plain["job_id"]], timeout=120)


async def test_a_job_that_cannot_fit_even_with_offload_is_refused(stack, http) -> None:
    body = SMALL | {"width": 256, "height": 256, "num_frames": 65}
    async with http.post(f"{stack.gateway_url}/api/v1/generate/text-to-video", json=body) as response:
        error = (await response.json())["error"]
    assert response.status == 422
    assert {d["field"] for d in error["details"]} == {"width", "height", "num_frames"}
    assert {d["rule"] for d in error["details"]} == {"fits_gpu_memory"}
    assert "256x256x65" in error["message"] and "group offload" in error["message"] and "GiB" in error["message"]


async def test_a_worker_fits_the_job_to_its_own_gpu(stack, http, worker_12gib) -> None:
    """A worker with 12 GiB runs a job planned resident for 80 GiB with VAE tiling, and fails what it
    cannot fit at all."""
    fits = await submit(http, stack.gateway_url, SMALL)
    too_big = await submit(http, stack.gateway_url, SMALL | {"width": 128, "height": 128})
    assert too_big["estimate"]["plan"] == "resident"  # the gateway plans for 80 GiB
    await watch(http, stack.gateway_url, [fits["job_id"], too_big["job_id"]], timeout=120)
    _, job = await get_json(http, f"{stack.gateway_url}/api/v1/jobs/{fits['job_id']}")
    assert job["status"] == "succeeded" and job["memory_plan"] == "vae_tiling"
    _, job = await get_json(http, f"{stack.gateway_url}/api/v1/jobs/{too_big['job_id']}")
    assert job["status"] == "failed" and job["error"]["code"] == "does_not_fit"
    assert "group offload" in job["error"]["message"]
