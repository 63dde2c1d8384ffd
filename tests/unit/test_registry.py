from __future__ import annotations

import pytest

from schemas.registry import load_registry
from schemas.requests import TextToVideoRequest


@pytest.fixture
def registry():
    return load_registry()


def resolve(registry, **fields):
    return registry.resolve(TextToVideoRequest(prompt="p", **fields), "text-to-video")


def test_defaults_fill_unset_fields(registry) -> None:
    params, problems = resolve(registry, model="ltx-video", seed=3)
    assert problems == []
    assert (params.width, params.height, params.num_frames, params.fps) == (704, 480, 121, 24)
    assert (params.num_inference_steps, params.guidance_scale, params.seed) == (50, 3.0, 3)


@pytest.mark.parametrize("sent", [None, "", "   ", "\n\t "])
def test_a_negative_prompt_empty_once_stripped_is_recorded_as_none(registry, sent) -> None:
    params, _ = resolve(registry, negative_prompt=sent)
    assert params.negative_prompt is None
    assert resolve(registry, negative_prompt="  blurry ")[0].negative_prompt == "blurry"


def test_default_model_and_random_seed(registry) -> None:
    params, _ = resolve(registry)
    assert params.model == registry.default_model == "ltx-video"
    assert 0 <= params.seed < 2**32


@pytest.mark.parametrize(
    ("model", "fields", "field", "rule", "nearest", "also"),
    [
        ("ltx-video", {"width": 500}, "width", "multiple_of_32", "480 or 512", None),
        # Below the minimum: only 256 is valid, and the range is named too.
        ("ltx-video", {"height": 250}, "height", "multiple_of_32", "256", "range"),
        ("ltx-video", {"width": 1300}, "width", "multiple_of_32", "1280", "range"),
        ("ltx-video", {"num_frames": 120}, "num_frames", "8k+1", "113 or 121", None),
        ("ltx-video", {"num_frames": 300}, "num_frames", "8k+1", "257", "maximum"),
        ("wan2-1-t2v-1-3b", {"width": 840}, "width", "multiple_of_16", "832 or 848", None),
        ("wan2-1-t2v-1-3b", {"num_frames": 80}, "num_frames", "4k+1", "77 or 81", None),
    ],
)
def test_rule_violations_name_the_nearest_valid_values(registry, model, fields, field, rule, nearest, also) -> None:
    params, problems = resolve(registry, model=model, **fields)
    assert params is None
    problem, *others = problems
    assert (problem.field, problem.rule) == (field, rule)
    assert problem.message.endswith(f"nearest valid values: {nearest}")
    # A value that is also out of the model's limits breaks that rule as well: both are named.
    assert [(other.field, other.rule) for other in others] == ([] if also is None else [(field, also)])


def test_valid_wan_sizes_pass(registry) -> None:
    params, problems = resolve(registry, model="wan2-1-t2v-1-3b", width=848, height=480, num_frames=33)
    assert problems == [] and params.fps == 16


def test_overrides_patch_one_entry(tmp_path) -> None:
    registry = load_registry(
        overrides={"ltx-video": {"path": "/models/ltx", "defaults": {"num_frames": 97}}}, default_model="ltx-tiny"
    )
    spec = registry.get("ltx-video")
    assert spec.repo is None and spec.source(tmp_path) == "/models/ltx"
    assert spec.defaults.num_frames == 97 and spec.defaults.width == 704
    assert registry.default_model == "ltx-tiny"
    assert registry.get("ltx-tiny").source(tmp_path) == str(tmp_path / "ltx-tiny")


def test_registry_file_is_checked(tmp_path) -> None:
    bad = tmp_path / "models.toml"
    bad.write_text(
        '[models.x]\nfamily = "ltx"\nnative_fps = 8\nmodes = ["text-to-video"]\n'
        "defaults = {width = 32, height = 32, num_frames = 9, num_inference_steps = 2, guidance_scale = 1.0}\n"
        "limits = {max_width = 64, max_height = 64, max_frames = 9}\n"
    )
    with pytest.raises(ValueError, match="exactly one of `repo` or `path`"):
        load_registry(bad)


def test_a_fast_tier_limited_to_some_modes_refuses_the_others(registry) -> None:
    """wan2-1-t2v-1-3b's fast tier serves text-to-video only: a fast video-to-video job is refused,
    naming the mode, and a standard one is not."""
    from schemas.requests import VideoToVideoRequest

    request = VideoToVideoRequest(prompt="p", model="wan2-1-t2v-1-3b", tier="fast")
    params, problems = registry.resolve(request, "video-to-video")
    assert params is None
    assert [(p.field, p.rule) for p in problems] == [("tier", "fast_tier_available")]
    assert problems[0].message == (
        "tier: model 'wan2-1-t2v-1-3b' has no fast tier for video-to-video (only for text-to-video)"
    )
    params, problems = registry.resolve(request.model_copy(update={"tier": "standard"}), "video-to-video")
    assert problems == [] and params.tier == "standard"
    params, problems = resolve(registry, model="wan2-1-t2v-1-3b", tier="fast")
    assert problems == [] and params.tier == "fast"
    params, problems = registry.resolve(request.model_copy(update={"model": "ltx-video"}), "video-to-video")
    assert problems == [] and params.tier == "fast"


def test_a_fast_tiers_modes_must_be_the_models(tmp_path) -> None:
    fast = {"cache": "taylorseer", "modes": ["image-to-video"]}
    with pytest.raises(ValueError, match="fast tier's `modes` must be among"):
        load_registry(overrides={"wan2-1-t2v-1-3b": {"speed": {"fast": fast}}})


@pytest.mark.parametrize(
    "fast",
    [
        {"cache": "taylorseer", "modes": []},
        {"cache": "taylorseer", "options": {"cache_interval": 0}},
        {"cache": "taylorseer", "options": {"disable_cache_before_step": 0}},
        {"cache": "taylorseer", "options": {"cache_interval": "5"}},
        {"cache": "taylorseer", "options": {"disable_cache_after_step": "late"}},
    ],
)
def test_a_fast_tier_that_cannot_run_is_refused_at_load(fast) -> None:
    """Each would fail every fast job (no mode, a division by zero, nothing to extrapolate from)."""
    with pytest.raises(ValueError, match="fast tier|modes"):
        load_registry(overrides={"ltx-video": {"speed": {"fast": fast}}})


def test_a_cache_that_needs_contexts_is_refused_for_a_pipeline_without_them() -> None:
    """TaylorSeer keeps its state per diffusers cache context, which WanVideoToVideoPipeline does not
    name: left to serve every mode, a Wan fast tier would fail each fast video-to-video job."""
    lite = {"use_lite_mode": True, "cache_interval": 5, "disable_cache_before_step": 3}
    with pytest.raises(ValueError, match="WanVideoToVideoPipeline \\(video-to-video\\) does not set"):
        load_registry(overrides={"wan-tiny": {"speed": {"fast": {"cache": "taylorseer", "options": lite}}}})
    fast = {"cache": "taylorseer", "options": lite, "modes": ["text-to-video"]}
    assert load_registry(overrides={"wan-tiny": {"speed": {"fast": fast}}}).get("wan-tiny").speed.fast.modes
    # PyramidAttentionBroadcast keeps no per-context state: it may serve every mode.
    pab = {"cache": "pyramid_attention_broadcast"}
    assert (
        load_registry(overrides={"wan-tiny": {"speed": {"fast": pab}}})
        .get("wan-tiny")
        .speed.fast.covers("video-to-video")
    )
