"""Load a model's diffusers pipeline once and run generations on it."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from PIL import Image

from schemas.cost import MemoryPlan
from schemas.jobs import GenerationMode, GenerationParams
from schemas.registry import PIPELINE_CLASSES, ModelSpec

log = structlog.get_logger("worker.pipelines")

StepCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class Inputs:
    """Decoded inputs, already fitted to the output size."""

    image: Image.Image | None = None
    video: list[Image.Image] | None = None


@dataclass(frozen=True)
class Generated:
    frames: np.ndarray  # uint8 (frames, height, width, 3)
    load_s: float  # call → first denoising step: prompt encoding, latents, conditioning
    denoise_s: float
    decode_s: float


def pick_device(setting: str) -> torch.device:
    """The device `VIDEOGEN_DEVICE` names (auto: CUDA if there is one); ValueError if this
    machine has no such CUDA device."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{setting!r}: this machine's torch sees no CUDA device")
        if device.index is not None and device.index >= count:
            raise ValueError(f"{setting!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return device


def pick_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting != "auto":
        return getattr(torch, setting)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def restore_forwards(model: torch.nn.Module) -> None:
    """Undo what removing diffusers hooks leaves behind: `forward` set on the module instances.

    diffusers puts the original bound method back as an instance attribute, which the graphs
    compiled for standard jobs do not match (they were traced without it): left there, the next
    standard job would compile its blocks again.
    """
    for module in model.modules():
        forward = module.__dict__.get("forward")
        if getattr(forward, "__func__", None) is type(module).forward and forward.__self__ is module:
            del module.forward


def _compile_for_the_fast_tier(model: torch.nn.Module, compiled: bool) -> dict[torch.nn.Module, tuple[Any, Any]]:
    """A second compiled call for each compiled block, used while a fast-tier cache is on (None, for
    eager blocks, when the tier is not `compiled`).

    The graphs traced around the cache's hooks (broken into pieces at each hooked attention) have
    no guard that fails once the hooks are gone: a standard call that could run them would, after
    any fast job, run on those pieces, slower, most of all on small videos (docs/PERFORMANCE.md,
    section 5). Each tier's call has a backend of its own (`_fast_call`), so each only ever runs
    the graphs traced for it, and the standard tier keeps its whole-block graphs (fullgraph).
    """
    blocks = [m for m in model.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    return {block: (block._compiled_call_impl, _fast_call(block) if compiled else None) for block in blocks}


def _fast_call(block: torch.nn.Module) -> Any:
    """A block's compiled call for fast jobs: without fullgraph, since the cache's hooks break graphs.

    torch.compile keeps the graphs of a function on its code object, and a call uses the first
    whose guards pass and whose backend equals its own, newest first. Both tiers' calls start in
    the block's `forward`, and a graph traced with a hook on a submodule (PyramidAttentionBroadcast
    hooks the attention) breaks before that submodule without guarding on the hook, so it would
    pass a standard call's guards too, and the standard tier would run the fast tier's pieces from
    then on. Backends are equal when their inductor options are: this one's options name one
    setting at the value it has, which changes nothing compiled but makes the backends unequal.
    """
    import torch._inductor.config as inductor

    return torch.compile(block._call_impl, fullgraph=False, options={"max_autotune": inductor.max_autotune})


def compiled_graphs(call: Callable[[], Any]) -> set[str]:
    """The torch.compile graphs one call runs through, as "frame/graph" ids ("0/0": frame 0's
    first graph): one per whole-block graph, more when graphs were broken into pieces, another
    graph of the same frame when a call ran one traced for something else, none when it ran
    eagerly. A diagnostic, for the tests and the GPU benchmark."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        call()
    prefix = "Torch-Compiled Region:"
    return {e.name[len(prefix) :].strip() for e in profile.events() if e.name.startswith(prefix)}


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """(frames, channels, height, width) floats in [0, 1] → uint8 (frames, height, width, channels)."""
    video = video.float().clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)
    return video.permute(0, 2, 3, 1).contiguous().cpu().numpy()


class ModelRunner:
    """One model's pipelines, one per mode, sharing one set of weights kept on its device."""

    def __init__(self, spec: ModelSpec, pipeline: Any, device: torch.device) -> None:
        import diffusers

        self.spec = spec
        self.device = device
        self.plan: MemoryPlan | None = "resident"  # None: unknown, after a change that failed part way
        # Compiled blocks: each block's compiled calls (for standard jobs, for fast ones).
        self._compiled_calls: dict[torch.nn.Module, tuple[Any, Any]] = {}
        base_mode = spec.modes[0]
        self.pipelines: dict[str, Any] = {base_mode: pipeline}
        for mode in spec.modes[1:]:
            # from_pipe shares the loaded modules: a mode switch never loads weights again.
            derived = getattr(diffusers, PIPELINE_CLASSES[(spec.family, mode)]).from_pipe(pipeline)
            derived.set_progress_bar_config(disable=True)
            self.pipelines[mode] = derived

    @classmethod
    def load(cls, spec: ModelSpec, models_dir: Path, device: torch.device, dtype: torch.dtype) -> ModelRunner:
        import diffusers
        import transformers

        # Progress bars would interleave with the JSON log lines.
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()

        pipeline_cls = getattr(diffusers, spec.pipeline or PIPELINE_CLASSES[(spec.family, spec.modes[0])])
        source = spec.source(models_dir)
        started = time.perf_counter()
        pipeline = pipeline_cls.from_pretrained(source, revision=spec.revision, dtype=dtype)
        pipeline.to(device)
        pipeline.set_progress_bar_config(disable=True)
        log.info(
            "model_loaded",
            model=spec.id,
            source=source,
            device=str(device),
            dtype=str(dtype),
            seconds=round(time.perf_counter() - started, 3),
        )
        return cls(spec, pipeline, device)

    def prepare(self, compile_blocks: bool = True) -> None:
        """Speed settings from the registry: attention backend, then compile and warm-up.

        The warm-up runs each configured (width, height, frames) in the model's first mode, in
        every tier that serves it, for as many steps as the tier needs to take each of its paths
        (2; TaylorSeer: to its first cached step and the full one after), so that no job pays
        for the compilation of its shape.
        """
        speed, fast = self.spec.speed, self.spec.speed.fast
        mode = self.spec.modes[0]  # the one that needs no input image or video
        pipe = self.pipelines[mode]
        if speed.attention_backend:
            pipe.transformer.set_attention_backend(speed.attention_backend)
        if not (speed.compile and compile_blocks):
            return
        self.compile_blocks()
        started = time.perf_counter()
        tiers = ["standard", "fast"] if fast is not None and fast.covers(mode) else ["standard"]
        for width, height, frames in speed.warmup:
            for tier in tiers:
                params = GenerationParams(
                    prompt="warm-up",
                    model=self.spec.id,
                    width=width,
                    height=height,
                    num_frames=frames,
                    fps=self.spec.native_fps,
                    num_inference_steps=fast.warmup_steps() if tier == "fast" else 2,
                    guidance_scale=self.spec.defaults.guidance_scale,
                    seed=0,
                    tier=tier,
                )
                self.generate(mode, params, Inputs(), lambda k, n: None)
        log.info(
            "warmup_done",
            model=self.spec.id,
            buckets=len(speed.warmup),
            tiers=tiers,
            seconds=round(time.perf_counter() - started, 2),
        )

    def compile_blocks(self, like: ModelRunner | None = None) -> None:
        """Compile the transformer's repeated blocks into whole-block graphs for standard jobs and,
        with a fast tier, a second compiled call per block for fast jobs (none: eager blocks, for a
        tier that is not `compiled`). `like`: a runner of the same pipeline whose blocks are
        compiled already, whose calls this one then shares."""
        fast = self.spec.speed.fast
        if like is not None:
            compiled = fast is not None and fast.compiled
            self._compiled_calls = {
                block: (standard, (fast_call or _fast_call(block)) if compiled else None)
                for block, (standard, fast_call) in like._compiled_calls.items()
            }
            return
        transformer = self.pipelines[self.spec.modes[0]].transformer
        transformer.compile_repeated_blocks(fullgraph=True)
        if fast:
            self._compiled_calls = _compile_for_the_fast_tier(transformer, fast.compiled)

    def generate(
        self, mode: GenerationMode, params: GenerationParams, inputs: Inputs, on_step: StepCallback
    ) -> Generated:
        """Run one generation on the calling thread; `on_step(k, n)` after each denoising step."""
        pipe = self.pipelines[mode]
        marks = {"first_step": 0.0, "last_step": 0.0}

        def first_call(*_: Any) -> None:
            if not marks["first_step"]:
                marks["first_step"] = time.perf_counter()

        def step_end(_pipe: Any, index: int, _timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
            marks["last_step"] = time.perf_counter()
            on_step(index + 1, getattr(_pipe, "num_timesteps", params.num_inference_steps))
            return callback_kwargs

        kwargs = self._call_kwargs(mode, params, inputs)
        kwargs.update(
            # A CPU generator gives the same noise for a seed on any device.
            generator=torch.Generator(device="cpu").manual_seed(params.seed),
            # Tensors, not numpy: the conversion to 8-bit runs on the device and a quarter of the
            # bytes cross to the host (float32 numpy cost ~0.5 s per 121-frame 768x512 video).
            output_type="pt",
            callback_on_step_end=step_end,
        )
        started = time.perf_counter()
        cached = self.uses_cache(mode, params)
        # The transformer's first call is where denoising starts.
        hook = pipe.transformer.register_forward_pre_hook(first_call)
        try:
            if cached:
                self._use_compiled_calls(fast=True)
                pipe.transformer.enable_cache(self._cache_config(pipe))
            output = pipe(**kwargs)
        finally:
            hook.remove()
            if cached:
                # A cache holds one job's state: never carried over, nor a tier's calls (also
                # when turning the cache on failed).
                if pipe.transformer.is_cache_enabled:
                    pipe.transformer.disable_cache()
                restore_forwards(pipe.transformer)
                self._use_compiled_calls(fast=False)
        frames = to_uint8_frames(output.frames[0])
        finished = time.perf_counter()
        last_step = marks["last_step"] or finished
        first_step = marks["first_step"] or started
        return Generated(
            frames=frames, load_s=first_step - started, denoise_s=last_step - first_step, decode_s=finished - last_step
        )

    def _use_compiled_calls(self, fast: bool) -> None:
        for block, calls in self._compiled_calls.items():
            block._compiled_call_impl = calls[fast]

    def uses_cache(self, mode: str, params: GenerationParams) -> bool:
        """Whether a job runs with the fast tier's cache: asked for, in a mode the tier serves, and
        the video is large enough to gain."""
        if self.spec.uses_fast_cache(mode, params):
            return True
        if params.tier == "fast" and (fast := self.spec.speed.fast) is not None:
            log.info(
                "fast_cache_skipped",
                model=self.spec.id,
                mode=mode,
                min_video_mpx=fast.min_video_mpx,
                fast_modes=fast.modes,
            )
        return False

    def apply_plan(self, plan: MemoryPlan) -> MemoryPlan:
        """Arrange the pipeline's memory use for a job (schemas/cost.py); returns the plan in force.

        Offload needs a CUDA device: elsewhere the leanest plan is VAE tiling. Group offload, once
        on, stays on (diffusers has no way back); model CPU offload is undone for a leaner job.
        """
        if plan in ("model_cpu_offload", "group_offload") and self.device.type != "cuda":
            log.warning("offload_needs_a_gpu", wanted=plan, device=str(self.device))
            plan = "vae_tiling"
        if self.plan == "group_offload":
            plan = "group_offload"
        if plan != self.plan:
            pipe = self.pipelines[self.spec.modes[0]]
            try:
                self._arrange(pipe, plan)
            except BaseException:
                # Part way (out of memory moving the weights, say): the weights go back to the CPU
                # and no plan is in force, so the next job arranges the pipeline from scratch.
                self.plan = None
                with contextlib.suppress(Exception):
                    pipe.remove_all_hooks()
                    pipe.to(torch.device("cpu"))
                raise
            log.info("memory_plan_changed", model=self.spec.id, before=self.plan, after=plan)
            self.plan = plan
        return plan

    def _arrange(self, pipe: Any, plan: MemoryPlan) -> None:
        if self.plan in ("model_cpu_offload", None):
            pipe.remove_all_hooks()
            # Back on the device only for a resident plan: group offload loads from the CPU,
            # and moving every weight to a GPU too small for them would run out of memory.
            pipe.to(self.device if plan in ("resident", "vae_tiling") else torch.device("cpu"))
        if plan == "model_cpu_offload":
            pipe.enable_model_cpu_offload(device=self.device)
        elif plan == "group_offload":
            pipe.enable_group_offload(
                onload_device=self.device,
                offload_device=torch.device("cpu"),
                offload_type="leaf_level",
                use_stream=True,
            )
        if plan == "resident":
            pipe.vae.disable_tiling()
        else:
            pipe.vae.enable_tiling()

    def _cache_config(self, pipe: Any) -> Any:
        import diffusers

        fast = self.spec.speed.fast
        assert fast is not None
        options = dict(fast.options)
        if fast.cache == "pyramid_attention_broadcast":
            options.setdefault("spatial_attention_block_skip_range", 2)
            options["spatial_attention_timestep_skip_range"] = tuple(
                options.get("spatial_attention_timestep_skip_range", (100, 800))
            )
            return diffusers.PyramidAttentionBroadcastConfig(
                current_timestep_callback=lambda: pipe.current_timestep, **options
            )
        if fast.cache == "first_block":
            return diffusers.FirstBlockCacheConfig(**options)
        return diffusers.TaylorSeerCacheConfig(**options)

    def release_memory(self) -> None:
        """After an interrupted generation: drop its tensors and hand cached GPU memory back."""
        import gc

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _call_kwargs(self, mode: GenerationMode, params: GenerationParams, inputs: Inputs) -> dict[str, Any]:
        """The pipeline arguments for this (family, mode)."""
        family = self.spec.family
        kwargs: dict[str, Any] = {
            "prompt": params.prompt,
            "negative_prompt": params.negative_prompt,
            "width": params.width,
            "height": params.height,
            "num_frames": params.num_frames,
            "num_inference_steps": params.num_inference_steps,
            "guidance_scale": params.guidance_scale,
        }
        kwargs.update(self.spec.call_args)  # e.g. a distilled checkpoint's timesteps
        if family == "ltx":
            kwargs["frame_rate"] = params.fps  # LTX conditions its position embedding on the frame rate
        if mode == "image-to-video":
            kwargs["image"] = inputs.image
        elif mode == "video-to-video" and family == "ltx":
            from diffusers.pipelines.ltx.pipeline_ltx_condition import LTXVideoCondition

            # A bare `video=frames` would condition on the first frame only.
            kwargs["conditions"] = [LTXVideoCondition(video=inputs.video, frame_index=0)]
            kwargs["denoise_strength"] = params.strength
        elif mode == "video-to-video" and family == "wan":
            del kwargs["num_frames"]  # Wan takes the length from the video itself
            kwargs["video"] = inputs.video
            kwargs["strength"] = params.strength
        return kwargs
