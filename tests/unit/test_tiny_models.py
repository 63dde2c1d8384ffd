"""The tiny offline pipelines must load through the real diffusers code paths and generate videos."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch the Hub

import numpy as np
import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    LTXConditionPipeline,
    LTXImageToVideoPipeline,
    LTXPipeline,
    WanImageToVideoPipeline,
    WanPipeline,
    WanVideoToVideoPipeline,
)
from diffusers.pipelines.ltx.pipeline_ltx_condition import LTXVideoCondition
from PIL import Image

from worker.tiny_models import build_all

STEPS = 2


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_all(tmp_path_factory.mktemp("models"))


def _load(cls, path):
    pipe = cls.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(width=32, height=32, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _generate(pipe, *, width=32, height=32, num_frames=9, steps=STEPS, expected_callbacks=STEPS, **kwargs):
    """Run the pipeline, check the output video's shape and that the step callback fired once per step."""
    calls = []

    def on_step_end(_pipe, step, _timestep, callback_kwargs):
        calls.append(step)
        return callback_kwargs

    if not isinstance(pipe, WanVideoToVideoPipeline):  # v2v takes its length from `video`
        kwargs["num_frames"] = num_frames
    frames = pipe(
        prompt="a red fox running through snow",
        width=width,
        height=height,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        callback_on_step_end=on_step_end,
        **kwargs,
    ).frames
    assert frames.shape == (1, num_frames, height, width, 3)
    assert np.isfinite(frames).all()
    assert calls == list(range(expected_callbacks))
    return frames


def test_build_all_is_idempotent(models):
    assert set(models) == {"ltx-tiny", "wan-tiny", "wan-i2v-tiny"}
    index = models["ltx-tiny"] / "model_index.json"
    mtime = index.stat().st_mtime_ns
    root = models["ltx-tiny"].parent
    assert build_all(root) == models
    assert index.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in root.iterdir()) == sorted(models)  # no staging leftovers


def test_tokenizer_survives_save_and_load(models):
    """transformers 5 rebuilds T5 tokenizers from the saved vocab; the text must still round-trip."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models["wan-tiny"] / "tokenizer")
    text = "A cat, walking on the beach at 5pm!"
    ids = tokenizer(text).input_ids
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


@pytest.mark.parametrize("size", [(32, 32, 9), (64, 32, 17)], ids=["32x32x9", "64x32x17"])
@pytest.mark.parametrize(("name", "cls"), [("ltx-tiny", LTXPipeline), ("wan-tiny", WanPipeline)])
def test_text_to_video(models, name, cls, size):
    pipe = _load(DiffusionPipeline, models[name])
    assert type(pipe) is cls
    width, height, num_frames = size
    _generate(pipe, width=width, height=height, num_frames=num_frames)


def test_ltx_vae_matches_production_ratios(models):
    pipe = _load(LTXPipeline, models["ltx-tiny"])
    assert (pipe.vae_spatial_compression_ratio, pipe.vae_temporal_compression_ratio) == (32, 8)


def test_ltx_image_to_video(models):
    _generate(_load(LTXImageToVideoPipeline, models["ltx-tiny"]), image=_image())


def test_ltx_condition_video(models):
    pipe = _load(LTXConditionPipeline, models["ltx-tiny"])
    clip = [_image(seed=i) for i in range(9)]
    _generate(pipe, conditions=[LTXVideoCondition(video=clip, frame_index=0)])


def test_wan_video_to_video(models):
    pipe = _load(WanVideoToVideoPipeline, models["wan-tiny"])
    clip = [_image(seed=i) for i in range(9)]
    # strength 0.8 of 3 steps skips the first step: int(3 * 0.8) = 2 denoising steps remain.
    _generate(pipe, video=clip, strength=0.8, steps=3, expected_callbacks=2)


@pytest.mark.parametrize("size", [(32, 32, 9), (64, 32, 17)], ids=["32x32x9", "64x32x17"])
def test_wan_image_to_video(models, size):
    pipe = _load(DiffusionPipeline, models["wan-i2v-tiny"])
    assert type(pipe) is WanImageToVideoPipeline
    width, height, num_frames = size
    _generate(pipe, image=_image(width, height), width=width, height=height, num_frames=num_frames)
