"""The worker's model runner on the tiny LTX pipeline, loaded through the real from_pretrained."""

from __future__ import annotations

import pytest
import torch

from schemas.jobs import GenerationParams
from schemas.registry import load_registry
from worker.pipelines import ModelRunner, pick_device, pick_dtype
from worker.tiny_models import build_tiny_ltx


@pytest.fixture(scope="module")
def runner(tmp_path_factory) -> ModelRunner:
    root = tmp_path_factory.mktemp("models")
    build_tiny_ltx(root / "ltx-tiny")
    spec = load_registry().get("ltx-tiny")
    device = pick_device("auto")
    return ModelRunner.load(spec, root, device, pick_dtype("auto", device))


def params(**changes) -> GenerationParams:
    base = dict(prompt="p", model="ltx-tiny", num_frames=17, width=64, height=32, fps=8, num_inference_steps=3,
                guidance_scale=1.0, seed=5)
    return GenerationParams(**(base | changes))


def test_generate_reports_each_step_and_returns_uint8_frames(runner) -> None:
    steps = []
    out = runner.generate(params(), lambda k, n: steps.append((k, n)))
    assert steps == [(1, 3), (2, 3), (3, 3)]
    assert out.frames.shape == (17, 32, 64, 3) and out.frames.dtype.name == "uint8"
    assert out.denoise_s > 0 and out.decode_s >= 0


def test_same_seed_same_video(runner) -> None:
    a = runner.generate(params(seed=11), lambda k, n: None).frames
    b = runner.generate(params(seed=11), lambda k, n: None).frames
    c = runner.generate(params(seed=12), lambda k, n: None).frames
    assert (a == b).all() and not (a == c).all()


def test_cpu_defaults_to_float32() -> None:
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert pick_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
