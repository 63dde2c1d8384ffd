"""The preflight estimate: fitted to measurements, plans in order, and the worker's plan switching."""

from __future__ import annotations

import pytest
import torch

from schemas.cost import OVERHEAD_GIB, PLANS, DoesNotFit, estimate, estimate_job, peaks, seconds
from schemas.registry import load_registry
from tests.helpers import tiny_params
from worker.pipelines import ModelRunner

REGISTRY = load_registry()
LTX, WAN = REGISTRY.models["ltx-video"].cost, REGISTRY.models["wan2-1-t2v-1-3b"].cost

# Bare diffusers on an H100, bf16 (the project's GPU reference runs, docs/PERFORMANCE.md):
# (width, height, frames, steps, seconds with CFG, eager) and (width, height, frames, tiled?, peak GiB
# without the text encoder).
SECONDS = [
    (cost, *row)
    for cost, rows in (
        (LTX, [(256, 256, 17, 50, 1.9), (512, 512, 65, 50, 3.7), (768, 512, 121, 50, 9.5), (768, 768, 129, 50, 17.5)]),
        (
            WAN,
            [
                (832, 480, 81, 50, 67.0),
                # bench/results/gpu-pipeline-h100-wan-large.json and -wan-eager-768x768-20.json
                (768, 512, 121, 10, 27.09),
                (768, 768, 129, 10, 55.83),
                (768, 768, 129, 20, 101.96),
            ],
        ),
    )
    for row in rows
]
PEAKS = [
    (LTX, 1024, 1024, 129, False, 17.18),
    (LTX, 1024, 1024, 129, True, 8.26),
    (LTX, 768, 512, 121, False, 8.91),
    (LTX, 1216, 704, 121, True, 7.62),
    (WAN, 832, 480, 33, False, 11.72),
    (WAN, 1280, 720, 81, False, 23.49),
    (WAN, 1280, 720, 81, True, 7.19),
]


@pytest.mark.parametrize("cost, width, height, frames, steps, measured", SECONDS)
def test_seconds_are_within_a_fifth_of_measurements(cost, width, height, frames, steps, measured) -> None:
    assert seconds(cost, width, height, frames, steps, 3.0) == pytest.approx(measured, rel=0.2)


@pytest.mark.parametrize("cost, width, height, frames, tiled, measured", PEAKS)
def test_peak_memory_is_within_a_tenth_of_measurements(cost, width, height, frames, tiled, measured) -> None:
    # The measurements ran without the text encoder on the GPU and count tensors only.
    peak = peaks(cost, width, height, frames)["vae_tiling" if tiled else "resident"]
    assert peak - OVERHEAD_GIB - cost.text_encoder_gib == pytest.approx(measured, rel=0.1)


# The fast tier's extra peak: the fast-taylorseer rows' peak minus the compile rows' in
# bench/results/gpu-pipeline-h100-{ltx,wan}-taylorseer.json (peaks rounded to 0.01 GiB).
FAST_CACHE = [
    (LTX, 768, 768, 129, 20.46 - 20.45),
    (LTX, 768, 512, 121, 17.77 - 17.76),
    (LTX, 512, 512, 65, 14.90 - 14.89),
    (WAN, 512, 512, 65, 19.49 - 19.48),
    # gpu-pipeline-h100-wan-fast-large.json's fast rows against gpu-pipeline-h100-wan-large.json's
    # compile (768x512x121) and eager (768x768x129, not compiled there) rows, the same peaks as compiled.
    (WAN, 768, 512, 121, 22.65 - 22.63),
    (WAN, 768, 768, 129, 27.17 - 27.13),
]


@pytest.mark.parametrize("cost, width, height, frames, measured", FAST_CACHE)
def test_the_fast_tiers_cache_adds_its_measured_memory(cost, width, height, frames, measured) -> None:
    standard, fast = peaks(cost, width, height, frames), peaks(cost, width, height, frames, fast_cache=True)
    extra = fast["resident"] - standard["resident"]  # as measured: all resident
    assert extra == pytest.approx(measured, rel=0.1, abs=0.01)
    for plan in PLANS:  # never more; less where the prompt encoding, before any cache, is the peak
        assert standard[plan] <= fast[plan] <= standard[plan] + extra + 0.01  # peaks are rounded to 0.01 GiB


def test_a_fast_job_that_only_fits_without_its_cache_gets_a_leaner_plan() -> None:
    """The gateway and the worker estimate with the cache exactly when the worker will run it."""
    spec = REGISTRY.models["ltx-video"]
    # A cache that holds as much as PyramidAttentionBroadcast did (4.2 GiB at 768x768x129).
    cost = LTX.model_copy(update={"fast_cache_gib_per_mpx": 0.055})
    standard = estimate(cost, 768, 768, 129, 50, 3.0, 22.0)
    assert standard.plan == "resident"
    fast = estimate(cost, 768, 768, 129, 50, 3.0, 22.0, fast_cache=True)
    assert fast.plan != "resident" and fast.peak_gib <= 22.0

    def job(tier: str, width: int, height: int, frames: int):
        return tiny_params(model="ltx-video", tier=tier, width=width, height=height, num_frames=frames)

    assert spec.uses_fast_cache("text-to-video", job("fast", 768, 768, 129))
    assert not spec.uses_fast_cache("text-to-video", job("standard", 768, 768, 129))
    assert spec.uses_fast_cache(
        "text-to-video", job("fast", 256, 256, 17)
    )  # TaylorSeer gains at every size: no minimum
    assert not REGISTRY.models["ltx-video-distilled"].uses_fast_cache("text-to-video", job("fast", 768, 768, 129))


def test_taylorseer_lite_runs_the_blocks_on_the_steps_diffusers_does() -> None:
    """7 of 20 steps, as counted on the tiny model (tests/unit/test_pipelines.py); 13 of 50."""
    fast = REGISTRY.models["ltx-video"].speed.fast
    assert [fast.transformer_steps(n) for n in (1, 3, 4, 5, 20, 50)] == [1, 3, 3, 4, 7, 13]
    stops = fast.model_copy(update={"options": fast.options | {"disable_cache_after_step": 15}})
    assert stops.transformer_steps(20) == 3 + 3 + 5  # steps 4, 9 and 14, then 15 to 19
    pab = fast.model_copy(update={"cache": "pyramid_attention_broadcast"})
    assert pab.transformer_steps(20) == 20  # reuses some attention per step: every step still runs the blocks


def test_video_to_video_counts_the_steps_its_strength_leaves() -> None:
    """Both families' video-to-video pipelines run int(steps x strength) steps."""
    spec = REGISTRY.models["ltx-video"]
    p = tiny_params(model="ltx-video", num_inference_steps=50, strength=0.8)
    assert spec.transformer_steps("video-to-video", p) == 40
    fast = p.model_copy(update={"tier": "fast"})
    assert spec.transformer_steps("video-to-video", fast) == 11  # steps 0, 1, 2, 4, 9, ..., 39
    assert spec.transformer_steps("text-to-video", fast.model_copy(update={"strength": None})) == 13


# The fast tier's time over the standard tier's, compiled both, in the same H100 run: 20 steps,
# fast-taylorseer and compile rows of bench/results/gpu-pipeline-h100-{ltx,wan}-taylorseer.json; Wan at
# the larger sizes, the fast rows' served and bare (compiled, standard) times of
# gpu-pipeline-h100-wan-fast-large.json (10 steps), gpu-pipeline-h100-wan-fast-768x512-20.json and
# gpu-pipeline-h100-wan-fast-768x768-20.json; LTX at 50 steps, the fast row's served and bare of
# gpu-pipeline-h100-ltx-fast-50.json.
FAST_SECONDS = [
    ("ltx-video", 512, 512, 65, 20, 0.448 / 0.946),
    ("ltx-video", 768, 512, 121, 20, 1.236 / 2.79),
    ("ltx-video", 768, 512, 121, 50, 2.015 / 6.895),
    ("ltx-video", 768, 768, 129, 20, 2.249 / 5.475),
    ("wan2-1-t2v-1-3b", 512, 512, 65, 20, 4.639 / 9.527),
    ("wan2-1-t2v-1-3b", 768, 512, 121, 10, 14.42 / 24.051),
    ("wan2-1-t2v-1-3b", 768, 768, 129, 10, 29.48 / 51.573),
    ("wan2-1-t2v-1-3b", 768, 512, 121, 20, 18.199 / 42.701),
    ("wan2-1-t2v-1-3b", 768, 768, 129, 20, 37.757 / 93.982),
]


@pytest.mark.parametrize("model, width, height, frames, steps, measured", FAST_SECONDS)
def test_a_fast_jobs_estimate_counts_only_the_steps_that_run_the_blocks(model, width, height, frames, steps, measured):
    spec = REGISTRY.models[model]

    def job(tier: str):
        p = tiny_params(model=model, tier=tier, width=width, height=height, num_frames=frames)
        return p.model_copy(update={"num_inference_steps": steps, "guidance_scale": 3.0})

    fast, standard = (estimate_job(spec, "text-to-video", job(tier), 80.0).seconds for tier in ("fast", "standard"))
    assert fast / standard == pytest.approx(measured, rel=0.15)


def test_less_memory_means_a_leaner_plan_then_a_refusal() -> None:
    plans = []
    for gib in (80, 16, 8):
        plans.append(estimate(LTX, 1216, 704, 121, 50, 3.0, gib).plan)
    assert plans == ["resident", "model_cpu_offload", "group_offload"]
    by_plan = peaks(LTX, 1216, 704, 121)
    assert [by_plan[p] for p in PLANS] == sorted((by_plan[p] for p in PLANS), reverse=True)
    with pytest.raises(DoesNotFit, match="group offload"):
        estimate(LTX, 1216, 704, 121, 50, 3.0, 4)
    slower = estimate(LTX, 1216, 704, 121, 50, 3.0, 8).seconds
    assert slower > estimate(LTX, 1216, 704, 121, 50, 3.0, 80).seconds


def test_no_guidance_halves_the_step_time() -> None:
    with_cfg = seconds(LTX, 768, 512, 121, 50, 3.0) - seconds(LTX, 768, 512, 121, 0, 3.0)
    without = seconds(LTX, 768, 512, 121, 50, 1.0) - seconds(LTX, 768, 512, 121, 0, 1.0)
    assert without == pytest.approx(with_cfg / 2)


class FakeVae:
    def __init__(self) -> None:
        self.tiling = False

    def enable_tiling(self) -> None:
        self.tiling = True

    def disable_tiling(self) -> None:
        self.tiling = False


class FakePipe:
    def __init__(self) -> None:
        self.vae, self.calls = FakeVae(), []

    def enable_model_cpu_offload(self, device) -> None:
        self.calls.append("model_cpu_offload")

    def enable_group_offload(self, **kwargs) -> None:
        self.calls.append("group_offload")

    def remove_all_hooks(self) -> None:
        self.calls.append("remove_hooks")

    def to(self, device) -> None:
        self.calls.append(f"to {torch.device(device).type}")


def runner(device: str) -> tuple[ModelRunner, FakePipe]:
    pipe = FakePipe()
    made = ModelRunner.__new__(ModelRunner)
    made.spec, made.device, made.plan = REGISTRY.models["ltx-video"], torch.device(device), "resident"
    made.pipelines = {"text-to-video": pipe}
    return made, pipe


def test_plans_switch_and_group_offload_stays() -> None:
    made, pipe = runner("cuda")  # no CUDA call is made: the fake pipeline records what would happen
    assert made.apply_plan("vae_tiling") == "vae_tiling" and pipe.vae.tiling
    assert made.apply_plan("model_cpu_offload") == "model_cpu_offload" and pipe.calls == ["model_cpu_offload"]
    assert made.apply_plan("resident") == "resident" and pipe.calls[-2:] == ["remove_hooks", "to cuda"]
    assert not pipe.vae.tiling
    assert made.apply_plan("model_cpu_offload") == "model_cpu_offload"
    assert made.apply_plan("group_offload") == "group_offload"
    assert pipe.calls[-3:] == ["remove_hooks", "to cpu", "group_offload"], "never all weights on a small GPU"
    assert made.apply_plan("resident") == "group_offload", "diffusers cannot undo group offload"
    assert pipe.calls.count("group_offload") == 1


def test_without_a_gpu_the_leanest_plan_is_vae_tiling() -> None:
    made, pipe = runner("cpu")
    assert made.apply_plan("group_offload") == "vae_tiling" and pipe.vae.tiling and pipe.calls == []


def test_a_change_that_fails_part_way_is_made_again_from_scratch() -> None:
    made, pipe = runner("cuda")
    assert made.apply_plan("model_cpu_offload") == "model_cpu_offload"
    moves = {"failed": False}

    def to(device) -> None:
        pipe.calls.append(f"to {torch.device(device).type}")
        if torch.device(device).type == "cuda" and not moves["failed"]:
            moves["failed"] = True
            raise torch.OutOfMemoryError("CUDA out of memory")

    pipe.to = to
    with pytest.raises(torch.OutOfMemoryError):
        made.apply_plan("resident")  # hooks removed, then the move to the GPU fails
    assert pipe.calls[-2:] == ["remove_hooks", "to cpu"], "the weights go back to the CPU"
    # The next job's plan is arranged again, not taken as already in force.
    assert made.apply_plan("model_cpu_offload") == "model_cpu_offload"
    assert pipe.calls[-1] == "model_cpu_offload"
