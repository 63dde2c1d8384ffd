"""Load a model's diffusers pipeline once and run generations on it."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch

from schemas.jobs import GenerationParams
from schemas.registry import ModelSpec

log = structlog.get_logger("worker.pipelines")

# The diffusers class that serves each (family, mode).
PIPELINE_CLASSES: dict[tuple[str, str], str] = {
    ("ltx", "text-to-video"): "LTXPipeline",
    ("wan", "text-to-video"): "WanPipeline",
}

StepCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class Generated:
    frames: np.ndarray  # uint8 (frames, height, width, 3)
    denoise_s: float
    decode_s: float


def pick_device(setting: str) -> torch.device:
    if setting != "auto":
        return torch.device(setting)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting != "auto":
        return getattr(torch, setting)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


class ModelRunner:
    """One model's pipeline, loaded once per process and kept on its device."""

    def __init__(self, spec: ModelSpec, pipeline: Any, device: torch.device) -> None:
        self.spec = spec
        self.pipeline = pipeline
        self.device = device

    @classmethod
    def load(cls, spec: ModelSpec, models_dir: Path, device: torch.device, dtype: torch.dtype) -> ModelRunner:
        import diffusers
        import transformers

        # Progress bars would interleave with the JSON log lines.
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()

        pipeline_cls = getattr(diffusers, PIPELINE_CLASSES[(spec.family, "text-to-video")])
        source = spec.source(models_dir)
        started = time.perf_counter()
        pipeline = pipeline_cls.from_pretrained(source, revision=spec.revision, dtype=dtype)
        pipeline.to(device)
        pipeline.set_progress_bar_config(disable=True)
        log.info("model_loaded", model=spec.id, source=source, device=str(device), dtype=str(dtype),
                 seconds=round(time.perf_counter() - started, 3))
        return cls(spec, pipeline, device)

    def generate(self, params: GenerationParams, on_step: StepCallback) -> Generated:
        """Run one generation on the calling thread; `on_step(k, n)` after each denoising step."""
        pipe = self.pipeline
        marks = {"last_step": 0.0}

        def step_end(_pipe: Any, index: int, _timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
            marks["last_step"] = time.perf_counter()
            on_step(index + 1, getattr(_pipe, "num_timesteps", params.num_inference_steps))
            return callback_kwargs

        kwargs: dict[str, Any] = {
            "prompt": params.prompt,
            "negative_prompt": params.negative_prompt,
            "width": params.width,
            "height": params.height,
            "num_frames": params.num_frames,
            "num_inference_steps": params.num_inference_steps,
            "guidance_scale": params.guidance_scale,
            # A CPU generator gives the same noise for a seed on any device.
            "generator": torch.Generator(device="cpu").manual_seed(params.seed),
            "output_type": "np",
            "callback_on_step_end": step_end,
        }
        if self.spec.family == "ltx":
            kwargs["frame_rate"] = params.fps  # LTX conditions its position embedding on the frame rate
        started = time.perf_counter()
        output = pipe(**kwargs)
        finished = time.perf_counter()
        frames = np.asarray(output.frames[0])
        frames = (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)
        last_step = marks["last_step"] or finished
        return Generated(frames=frames, denoise_s=last_step - started, decode_s=finished - last_step)
