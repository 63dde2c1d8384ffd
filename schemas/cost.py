"""Preflight estimate of a job's peak GPU memory and seconds, and the memory plan that makes it fit.

The gateway runs it at submission (to refuse what cannot fit, and to tell the client what to
expect); the worker runs it again with its own GPU's memory before the job starts, and applies
the plan. The coefficients of each model live in the registry (`cost`), fitted to measurements
of the real architectures in bf16 on a reference GPU (see docs/PERFORMANCE.md).

Plans, from fastest to leanest:
- `resident`: every component stays on the GPU.
- `vae_tiling`: as resident, with the VAE decoding in tiles (peak memory of the decode drops).
- `model_cpu_offload`: components move to the GPU one at a time (text encoder, then transformer,
  then VAE), with VAE tiling.
- `group_offload`: layers stream to the GPU as they run (leaf level, on a CUDA stream), with VAE
  tiling: the least memory, and the slowest.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MemoryPlan = Literal["resident", "vae_tiling", "model_cpu_offload", "group_offload"]
PLANS: tuple[MemoryPlan, ...] = ("resident", "vae_tiling", "model_cpu_offload", "group_offload")
# Relative time of each plan (measured on LTX 2B: group offload 0.77x the speed of resident).
PLAN_SLOWDOWN = {"resident": 1.0, "vae_tiling": 1.02, "model_cpu_offload": 1.15, "group_offload": 1.3}
# What group offload keeps on the GPU besides activations: the layers in flight and buffers.
GROUP_OFFLOAD_RESIDENT_GIB = 1.0
# Memory the CUDA context and allocator slack take beyond what tensors use.
OVERHEAD_GIB = 1.0


class CostModel(BaseModel):
    """A model's memory and time coefficients (registry `cost` table)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    reference_gpu: str = Field(description="Where the coefficients were measured, e.g. 'H100 80GB'.")
    denoiser_gib: float = Field(ge=0, description="Transformer and VAE weights.")
    text_encoder_gib: float = Field(ge=0, description="Text (and image) encoder weights.")
    encode_gib: float = Field(default=0.0, ge=0, description="Activations while encoding the prompt.")
    # Extra memory of the VAE decode, untiled and tiled: per million output pixels (frames x
    # height x width), per million pixels of one frame, and per frame.
    decode_gib_per_mpx: float = 0.0
    decode_gib_per_frame_mpx: float = 0.0
    tiled_decode_gib_per_frame: float = 0.0
    tiled_decode_gib_per_frame_mpx: float = 0.0
    # Seconds per denoising step (with classifier-free guidance) as c0 + c1*t + c2*t^2, t = latent tokens.
    step_s: tuple[float, float, float]
    decode_s_base: float = 0.0
    decode_s_per_mpx: float = 0.0
    # What the fast tier's cache holds on the GPU (from the first cached step until the pipeline
    # call returns, through the decode), per million output pixels: added to the denoise and
    # decode part of every plan's peak when a job runs with it (not to the prompt encoding's).
    fast_cache_gib_per_mpx: float = 0.0
    # Latent geometry, to count tokens: spatial and temporal compression, and the patch size.
    spatial_ratio: int = 32
    temporal_ratio: int = 8
    patch: int = 1


class Estimate(BaseModel):
    """The preflight estimate, as the 202 answer and the job record show it."""

    plan: MemoryPlan = Field(description="How the job is run to fit its GPU (see docs/PERFORMANCE.md).")
    peak_gib: float = Field(description="Estimated peak GPU memory with that plan.")
    seconds: float = Field(description="Estimated generation seconds (denoise + decode) on the reference GPU.")
    gpu_memory_gib: float = Field(description="The GPU memory the estimate was made for.")
    reference_gpu: str
    peaks_gib: dict[str, float] = Field(description="Estimated peak of every plan, for comparison.")


class DoesNotFit(ValueError):
    """Even the leanest plan needs more memory than the GPU has."""

    def __init__(self, needed_gib: float, gpu_gib: float) -> None:
        super().__init__(
            f"needs about {needed_gib:.1f} GiB of GPU memory even with group offload; the GPUs "
            f"have {gpu_gib:.1f} GiB: lower width, height or num_frames"
        )
        self.needed_gib, self.gpu_gib = needed_gib, gpu_gib


def latent_tokens(cost: CostModel, width: int, height: int, frames: int) -> int:
    lf = (frames - 1) // cost.temporal_ratio + 1
    side = cost.spatial_ratio * cost.patch
    return lf * max(1, height // side) * max(1, width // side)


def peaks(cost: CostModel, width: int, height: int, frames: int, fast_cache: bool = False) -> dict[MemoryPlan, float]:
    """Estimated peak GPU memory (GiB) of each plan; `fast_cache`: the job runs with the fast tier's cache."""
    mpx, frame_mpx = frames * width * height / 1e6, width * height / 1e6
    decode = cost.decode_gib_per_mpx * mpx + cost.decode_gib_per_frame_mpx * frame_mpx
    tiled = min(decode, cost.tiled_decode_gib_per_frame * frames + cost.tiled_decode_gib_per_frame_mpx * frame_mpx)
    weights = cost.denoiser_gib + cost.text_encoder_gib
    cache = cost.fast_cache_gib_per_mpx * mpx if fast_cache else 0.0
    return {
        "resident": OVERHEAD_GIB + weights + max(cost.encode_gib, decode + cache),
        "vae_tiling": OVERHEAD_GIB + weights + max(cost.encode_gib, tiled + cache),
        "model_cpu_offload": OVERHEAD_GIB
        + max(cost.text_encoder_gib + cost.encode_gib, cost.denoiser_gib + tiled + cache),
        "group_offload": OVERHEAD_GIB + GROUP_OFFLOAD_RESIDENT_GIB + max(cost.encode_gib, tiled + cache),
    }


def seconds(cost: CostModel, width: int, height: int, frames: int, steps: int, guidance_scale: float) -> float:
    """Denoise plus decode seconds on the reference GPU, with every component resident. `steps`: the
    denoising steps that run the transformer (a fast tier's cached steps cost next to nothing)."""
    t = latent_tokens(cost, width, height, frames)
    c0, c1, c2 = cost.step_s
    per_step = c0 + c1 * t + c2 * t * t
    if guidance_scale <= 1.0:
        per_step /= 2  # no classifier-free guidance: one transformer pass per step instead of two
    return steps * per_step + cost.decode_s_base + cost.decode_s_per_mpx * frames * width * height / 1e6


def estimate(
    cost: CostModel,
    width: int,
    height: int,
    frames: int,
    steps: int,
    guidance_scale: float,
    gpu_memory_gib: float,
    fast_cache: bool = False,
) -> Estimate:
    """The fastest plan that fits `gpu_memory_gib`; DoesNotFit when none does. `steps`: those that
    run the transformer."""
    by_plan = peaks(cost, width, height, frames, fast_cache)
    for plan in PLANS:
        if by_plan[plan] <= gpu_memory_gib:
            break
    else:
        raise DoesNotFit(by_plan["group_offload"], gpu_memory_gib)
    return Estimate(
        plan=plan,
        peak_gib=round(by_plan[plan], 2),
        seconds=round(seconds(cost, width, height, frames, steps, guidance_scale) * PLAN_SLOWDOWN[plan], 2),
        gpu_memory_gib=gpu_memory_gib,
        reference_gpu=cost.reference_gpu,
        peaks_gib={p: round(v, 2) for p, v in by_plan.items()},
    )


def estimate_job(spec: Any, mode: str, params: Any, gpu_memory_gib: float) -> Estimate:
    """`estimate` for a job's mode and resolved parameters (GenerationParams) on its model (ModelSpec,
    with a cost model): with the fast tier's cache and steps exactly when the worker will run them."""
    return estimate(
        spec.cost,
        params.width,
        params.height,
        params.num_frames,
        spec.transformer_steps(mode, params),
        params.guidance_scale,
        gpu_memory_gib,
        spec.uses_fast_cache(mode, params),
    )
