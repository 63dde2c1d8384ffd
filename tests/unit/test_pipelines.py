"""The worker's model runner on the tiny pipelines, loaded through the real from_pretrained."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from schemas.jobs import GenerationParams
from schemas.registry import load_registry
from worker.pipelines import Inputs, ModelRunner, compiled_graphs, pick_device, pick_dtype
from worker.tiny_models import build_all


@pytest.fixture(scope="module")
def model_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    build_all(root)
    return root


@pytest.fixture(scope="module")
def runners(model_root) -> dict[str, ModelRunner]:
    root = model_root
    registry = load_registry()
    device = pick_device("auto")
    return {
        m: ModelRunner.load(registry.get(m), root, device, pick_dtype("auto", device))
        for m in ("ltx-tiny", "wan-tiny", "wan-i2v-tiny")
    }


def params(model: str, **changes) -> GenerationParams:
    base = dict(
        prompt="p",
        model=model,
        num_frames=17,
        width=64,
        height=32,
        fps=8,
        num_inference_steps=3,
        guidance_scale=1.0,
        seed=5,
    )
    return GenerationParams(**(base | changes))


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    ("model", "mode", "strength", "steps_run"),
    [
        ("ltx-tiny", "text-to-video", None, 3),
        ("ltx-tiny", "image-to-video", None, 3),
        ("ltx-tiny", "video-to-video", 0.8, None),
        ("wan-tiny", "text-to-video", None, 3),
        ("wan-tiny", "video-to-video", 0.7, 2),  # Wan's v2v runs int(steps * strength) steps
        ("wan-i2v-tiny", "image-to-video", None, 3),
    ],
)
def test_every_mode_reports_each_step_and_returns_the_requested_video(
    runners, model, mode, strength, steps_run
) -> None:
    runner = runners[model]
    size = (64, 32)
    inputs = Inputs(image=picture(*size), video=[picture(*size, seed=i) for i in range(17)])
    steps = []
    out = runner.generate(mode, params(model, strength=strength), inputs, lambda k, n: steps.append((k, n)))
    total = steps[-1][1]
    assert steps == [(k, total) for k in range(1, total + 1)]
    if steps_run is not None:
        assert total == steps_run
    assert out.frames.shape == (17, 32, 64, 3) and out.frames.dtype.name == "uint8"


def test_the_pipelines_without_cache_contexts_are_those_the_registry_names() -> None:
    """schemas/registry.py refuses context-keeping caches (TaylorSeer, First-Block-Cache) for the
    pipelines that call the transformer without diffusers' cache contexts: read from diffusers."""
    import inspect

    import diffusers

    from schemas.registry import PIPELINE_CLASSES, PIPELINES_WITHOUT_CACHE_CONTEXTS

    classes = set(PIPELINE_CLASSES.values()) | {"LTXConditionPipeline"}
    without = {name for name in classes if "cache_context" not in inspect.getsource(getattr(diffusers, name))}
    assert without == PIPELINES_WITHOUT_CACHE_CONTEXTS


def test_modes_share_one_set_of_weights(runners) -> None:
    runner = runners["ltx-tiny"]
    pipes = list(runner.pipelines.values())
    assert len(pipes) == 3 and all(p.transformer is pipes[0].transformer for p in pipes)


def test_same_seed_same_video(runners) -> None:
    runner = runners["ltx-tiny"]

    def run(seed: int) -> np.ndarray:
        return runner.generate("text-to-video", params("ltx-tiny", seed=seed), Inputs(), lambda k, n: None).frames

    a, b, c = run(11), run(11), run(12)
    assert (a == b).all() and not (a == c).all()


def test_cpu_defaults_to_float32() -> None:
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert pick_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16


def test_a_distilled_schedule_reaches_the_pipeline(runners, tmp_path) -> None:
    """The registry's call_args go into the pipeline call: its timesteps, not num_inference_steps, set the steps."""
    from diffusers import LTXConditionPipeline

    patch = {
        "pipeline": "LTXConditionPipeline",
        "modes": ["text-to-video"],
        "call_args": {"timesteps": [1000, 700, 400, 100]},
    }
    spec = load_registry(overrides={"ltx-tiny": patch}).get("ltx-tiny")
    pipe = LTXConditionPipeline.from_pipe(runners["ltx-tiny"].pipelines["text-to-video"])
    pipe.set_progress_bar_config(disable=True)
    runner = ModelRunner(spec, pipe, runners["ltx-tiny"].device)
    seen = []
    runner.generate(
        "text-to-video", params("ltx-tiny", num_inference_steps=2), Inputs(), lambda k, n: seen.append((k, n))
    )
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


def fast_runner(runners, **fast) -> ModelRunner:
    """The tiny LTX weights with a fast tier (PyramidAttentionBroadcast), sharing the loaded pipeline."""
    tier = {"cache": "pyramid_attention_broadcast", "options": {"spatial_attention_block_skip_range": 2}} | fast
    spec = load_registry(overrides={"ltx-tiny": {"modes": ["text-to-video"], "speed": {"fast": tier}}}).get("ltx-tiny")
    base = runners["ltx-tiny"]
    return ModelRunner(spec, base.pipelines["text-to-video"], base.device)


def test_a_fast_job_leaves_the_transformer_as_it_found_it(runners) -> None:
    """No cache state and no hooked `forward` left on any module: later jobs run the graphs compiled before."""
    runner = fast_runner(runners)
    transformer = runner.pipelines["text-to-video"].transformer
    p = params("ltx-tiny", guidance_scale=3.0, num_inference_steps=4)
    before = runner.generate("text-to-video", p, Inputs(), lambda k, n: None).frames
    fast = runner.generate("text-to-video", p.model_copy(update={"tier": "fast"}), Inputs(), lambda k, n: None)
    after = runner.generate("text-to-video", p, Inputs(), lambda k, n: None).frames
    assert fast.frames.shape == before.shape
    assert [name for name, m in transformer.named_modules() if "forward" in m.__dict__] == []
    assert (before == after).all()


def test_a_fast_job_whose_cache_cannot_be_turned_on_leaves_the_standard_calls(runners, monkeypatch) -> None:
    """The blocks go back to the standard tier's compiled calls even when `enable_cache` raises."""
    runner = fast_runner(runners)
    transformer = runner.pipelines["text-to-video"].transformer

    class Block:
        _compiled_call_impl = "standard"

    block = Block()
    runner._compiled_calls = {block: ("standard", "fast")}

    def refuse(config):
        raise ValueError("Caching has already been enabled")

    monkeypatch.setattr(transformer, "enable_cache", refuse)
    p = params("ltx-tiny", num_inference_steps=2, tier="fast")
    with pytest.raises(ValueError, match="already been enabled"):
        runner.generate("text-to-video", p, Inputs(), lambda k, n: None)
    assert block._compiled_call_impl == "standard"
    assert not transformer._forward_pre_hooks  # the first-call hook is gone too


def test_the_fast_tier_skips_its_cache_below_the_models_minimum_size(runners, monkeypatch) -> None:
    model_class = type(runners["ltx-tiny"].pipelines["text-to-video"].transformer)
    enabled = []
    real = model_class.enable_cache

    def spy(self, config):
        enabled.append(config)
        return real(self, config)

    monkeypatch.setattr(model_class, "enable_cache", spy)  # on the class: nothing left on the shared instance
    p = params("ltx-tiny", tier="fast")  # 64x32x17: 0.035 megapixel-frames
    fast_runner(runners, min_video_mpx=0.04).generate("text-to-video", p, Inputs(), lambda k, n: None)
    assert enabled == []
    fast_runner(runners, min_video_mpx=0.03).generate("text-to-video", p, Inputs(), lambda k, n: None)
    assert len(enabled) == 1
    fast_runner(runners, min_video_mpx=0.03).generate(
        "text-to-video", p.model_copy(update={"tier": "standard"}), Inputs(), lambda k, n: None
    )
    assert len(enabled) == 1


def test_taylorseer_lite_skips_the_blocks_on_most_steps_and_starts_afresh_each_job(runners) -> None:
    """The registry's options reach diffusers' TaylorSeerCacheConfig: 3 full steps, then 1 in 5."""
    options = {"use_lite_mode": True, "cache_interval": 5, "disable_cache_before_step": 3}
    runner = fast_runner(runners, cache="taylorseer", options=options)
    transformer = runner.pipelines["text-to-video"].transformer
    runs = []
    hook = transformer.transformer_blocks[0].attn1.register_forward_pre_hook(lambda *_: runs.append(1))
    try:
        p = params("ltx-tiny", num_inference_steps=20)
        counted = []
        for tier in ("fast", "standard", "fast"):
            runs.clear()
            runner.generate("text-to-video", p.model_copy(update={"tier": tier}), Inputs(), lambda k, n: None)
            counted.append(len(runs))
    finally:
        hook.remove()
    assert counted == [7, 20, 7]  # steps 0, 1, 2, 4, 9, 14, 19 run the blocks


@pytest.mark.parametrize(
    ("model", "registry_model", "mode", "strength", "cached"),
    [
        ("ltx-tiny", "ltx-video", "text-to-video", None, True),
        ("ltx-tiny", "ltx-video", "image-to-video", None, True),
        ("ltx-tiny", "ltx-video", "video-to-video", 0.8, True),
        ("wan-tiny", "wan2-1-t2v-1-3b", "text-to-video", None, True),
        # WanVideoToVideoPipeline sets no cache contexts, which TaylorSeer needs: the tier leaves it out.
        ("wan-tiny", "wan2-1-t2v-1-3b", "video-to-video", 0.8, False),
    ],
)
def test_the_registrys_fast_tier_skips_the_blocks_in_the_modes_it_serves(
    runners, model, registry_model, mode, strength, cached
) -> None:
    """TaylorSeer lite, as the registry sets it for the real models, on each mode of the tiny model
    of the family: where it serves the mode the blocks run on fewer steps than the job has."""
    fast = load_registry().get(registry_model).speed.fast.model_dump()
    spec = load_registry(overrides={model: {"speed": {"fast": fast}}}).get(model)
    base = runners[model]
    runner = ModelRunner(spec, base.pipelines["text-to-video"], base.device)
    transformer = runner.pipelines[mode].transformer
    first_block = (transformer.transformer_blocks if model.startswith("ltx") else transformer.blocks)[0]
    runs = []  # the block's own hook decides whether it runs: count inside it
    hook = first_block.attn1.register_forward_pre_hook(lambda *_: runs.append(1))
    size = (64, 32)
    inputs = Inputs(image=picture(*size), video=[picture(*size, seed=i) for i in range(17)])
    steps = []
    try:
        p = params(model, strength=strength, tier="fast", num_inference_steps=12, guidance_scale=1.0)
        out = runner.generate(mode, p, inputs, lambda k, n: steps.append(k))
    finally:
        hook.remove()
    assert out.frames.shape == (17, 32, 64, 3)
    assert runner.uses_cache(mode, p) is cached
    assert (0 < len(runs) < len(steps)) if cached else len(runs) == len(steps), (len(runs), len(steps))
    assert [name for name, m in transformer.named_modules() if "forward" in m.__dict__] == []


def fresh_runner(model_root, fast: dict) -> ModelRunner:
    """ltx-tiny with blocks compiled and this fast tier, on weights of its own, compiled afresh:
    torch.compile keeps graphs per function (the block class's `forward`), for every instance, so
    graphs that earlier tests traced would otherwise serve this runner's calls."""
    torch._dynamo.reset()
    patch = {"modes": ["text-to-video"], "speed": {"compile": True, "fast": fast}}
    spec = load_registry(overrides={"ltx-tiny": patch}).get("ltx-tiny")
    runner = ModelRunner.load(spec, model_root, torch.device("cpu"), torch.float32)
    runner.prepare()
    return runner


def compiled_regions(runner: ModelRunner, p: GenerationParams) -> set[str]:
    """The torch.compile graphs one generation ran through ("frame/graph" ids): one per whole-block
    graph, more when graphs were broken into pieces."""
    return compiled_graphs(lambda: runner.generate("text-to-video", p, Inputs(), lambda k, n: None))


LITE = {"use_lite_mode": True, "cache_interval": 5, "disable_cache_before_step": 3}


FAST_TIERS = pytest.mark.parametrize(
    "fast",
    [
        {"cache": "pyramid_attention_broadcast", "options": {"spatial_attention_block_skip_range": 2}},
        {"cache": "taylorseer", "options": LITE},
        {"cache": "taylorseer", "options": LITE, "compiled": False},
    ],
    ids=["pyramid_attention_broadcast", "taylorseer_lite", "taylorseer_lite_eager_blocks"],
)


@FAST_TIERS
def test_standard_jobs_after_a_fast_one_run_the_same_whole_block_graphs(model_root, fast) -> None:
    """Each tier has its own compiled calls: the graphs traced around the cache's hooks (in pieces)
    never serve a standard job, which before ran on them after any fast job (with
    PyramidAttentionBroadcast also when each tier had a compiled call of its own, whose backends
    torch.compile took for the same). A fast tier that is
    not `compiled` runs its jobs on eager blocks: no graph is traced around its hooks at all."""
    runner = fresh_runner(model_root, fast)
    p = params("ltx-tiny", guidance_scale=3.0, num_inference_steps=4)
    before = compiled_regions(runner, p)
    fast_regions = compiled_regions(runner, p.model_copy(update={"tier": "fast"}))
    after = compiled_regions(runner, p)
    assert len(before) == 1 and after == before
    if fast.get("compiled", True):
        assert fast_regions - before, "the fast tier ran graphs of its own"
    else:
        assert fast_regions == set(), "the fast tier ran on eager blocks"


def test_after_the_warm_up_a_taylorseer_job_compiles_nothing(model_root) -> None:
    """TaylorSeer (lite) as the fast tier: its warm-up (to the first cached step and the full one
    after it) compiles every graph and traces every frame its jobs run, cached steps included, and
    standard jobs between fast ones compile nothing either."""
    from torch._dynamo.utils import counters

    options = {"use_lite_mode": True, "cache_interval": 5, "disable_cache_before_step": 3}
    patch = {
        "modes": ["text-to-video"],
        "speed": {"compile": True, "warmup": [[64, 32, 17]], "fast": {"cache": "taylorseer", "options": options}},
    }
    spec = load_registry(overrides={"ltx-tiny": patch}).get("ltx-tiny")
    runner = ModelRunner.load(spec, model_root, torch.device("cpu"), torch.float32)  # its own weights
    runner.prepare()
    compiled, traced = counters["stats"]["unique_graphs"], counters["frames"]["total"]
    p = params("ltx-tiny", guidance_scale=runner.spec.defaults.guidance_scale, num_inference_steps=12)
    for tier in ("fast", "standard", "fast"):
        runner.generate("text-to-video", p.model_copy(update={"tier": tier}), Inputs(), lambda k, n: None)
    assert (counters["stats"]["unique_graphs"], counters["frames"]["total"]) == (compiled, traced)


@FAST_TIERS
def test_a_standard_job_after_a_fast_one_does_the_same_work_on_the_host(model_root, fast) -> None:
    """Where the GPU waits on the host (small videos), the host's work per job sets its time: after
    a fast job, a standard job runs the same torch operations as before it, and the same Python
    calls within 0.1 % (diffusers visits the empty hook registries the cache leaves; it walks the
    module tree for them once, in the first standard job after the fast one)."""
    import collections
    import cProfile
    import pstats

    runner = fresh_runner(model_root, fast)
    p = params("ltx-tiny", guidance_scale=3.0, num_inference_steps=6)

    def census(tier: str = "standard") -> tuple[int, collections.Counter]:
        def job() -> None:
            runner.generate("text-to-video", p.model_copy(update={"tier": tier}), Inputs(), lambda k, n: None)

        profile = cProfile.Profile()
        profile.runcall(job)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as ops:
            job()
        return pstats.Stats(profile).total_calls, collections.Counter(e.name for e in ops.events())

    census()  # compiles the standard tier's graphs for this size
    calls_before, ops_before = census()
    census("fast")
    census()  # the first after it: diffusers walks the module tree for hook registries again, once
    calls_after, ops_after = census()
    assert ops_after == ops_before
    assert abs(calls_after - calls_before) <= calls_before // 1000, (calls_before, calls_after)
