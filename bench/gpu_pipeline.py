"""Served vs bare: the worker's generation path against a bare diffusers call, same pipeline, same run.

Real-size LTX-Video 2B and Wan2.1 1.3B architectures with random weights (no download): the
transformer, the VAE and a full-size T5/UMT5 text encoder, with a tokenizer built offline. For each
size it times, alternating, a bare `pipe(...)` call and the worker's `ModelRunner.generate` (the
same pipeline object), then the MP4 encode the worker does after it, and prints served/bare.

    python bench/gpu_pipeline.py --out bench/results/gpu-pipeline.json          # on a GPU
    python bench/gpu_pipeline.py --tiny --out /tmp/gpu-pipeline-tiny.json       # CPU smoke test
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from schemas.jobs import GenerationParams  # noqa: E402
from schemas.registry import ModelSpec, load_registry  # noqa: E402
from worker.encode import encode_mp4  # noqa: E402
from worker.pipelines import Inputs, ModelRunner, compiled_graphs  # noqa: E402

# (width, height, frames): the seed's three sizes and LTX's 768x512x121 reference.
SIZES = [(256, 256, 17), (512, 512, 65), (768, 512, 121), (768, 768, 129)]
CONFIGS = (
    "eager",
    "compile",
    "fast",
    "after-fast",
    "fast-eager",
    "after-fast-eager",
    "fast-schedule",
    "fast-pab",
    "after-fast-pab",
    "fast-wide",
)
PROMPT = "a red fox running through fresh snow at golden hour, cinematic"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# The registry's model of each family, whose fast tier the `fast` configuration runs.
REGISTRY_MODEL = {"ltx": "ltx-video", "wan": "wan2-1-t2v-1-3b"}
# The fast tier before TaylorSeer: PyramidAttentionBroadcast, measured beside it (`fast-pab`), and a
# wider variant of it (more blocks and more of the schedule skipped, `fast-wide`).
PAB_FAST = {
    "cache": "pyramid_attention_broadcast",
    "options": {"spatial_attention_block_skip_range": 2, "spatial_attention_timestep_skip_range": [100, 800]},
}
WIDE_FAST = {
    "cache": "pyramid_attention_broadcast",
    "options": {"spatial_attention_block_skip_range": 3, "spatial_attention_timestep_skip_range": [100, 950]},
}


def spec_for(family: str, fast: dict[str, Any] | None = None) -> ModelSpec:
    if fast is None:
        tier = load_registry().get(REGISTRY_MODEL[family]).speed.fast
        fast = tier.model_dump() if tier else None
    return ModelSpec(
        id=f"bench-{family}",
        family=family,
        repo="bench/random",
        native_fps=24 if family == "ltx" else 16,
        modes=["text-to-video"],
        defaults={"width": 256, "height": 256, "num_frames": 17, "num_inference_steps": 30, "guidance_scale": 3.0},
        limits={"min_size": 32, "max_width": 1280, "max_height": 1280, "max_frames": 257},
        speed={"fast": fast},
    )


def real_pipeline(family: str, device: torch.device, dtype: torch.dtype) -> Any:
    """Real-size architectures, random weights, built directly on the device."""
    from diffusers import (
        AutoencoderKLLTXVideo,
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
        UniPCMultistepScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    from worker.tiny_models import _t5_tokenizer

    def build(factory):
        with torch.device(device):
            module = factory()
        return module.to(dtype).eval()

    xxl = dict(
        d_model=4096,
        d_kv=64,
        d_ff=10240,
        num_layers=24,
        num_heads=64,
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
    )
    if family == "ltx":
        return LTXPipeline(
            transformer=build(LTXVideoTransformer3DModel),
            vae=build(AutoencoderKLLTXVideo),
            text_encoder=build(lambda: T5EncoderModel(T5Config(vocab_size=32128, **xxl))),
            tokenizer=_t5_tokenizer(128),
            scheduler=FlowMatchEulerDiscreteScheduler(),
        )
    transformer = build(
        lambda: WanTransformer3DModel(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30)
    )
    return WanPipeline(
        transformer=transformer,
        vae=build(AutoencoderKLWan).to(torch.float32),  # Wan's VAE runs in float32
        text_encoder=build(lambda: UMT5EncoderModel(UMT5Config(vocab_size=256384, **xxl))),
        tokenizer=_t5_tokenizer(512),
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
    )


def tiny_pipeline(family: str, device: torch.device, dtype: torch.dtype, layers: int = 1) -> Any:
    from diffusers import LTXPipeline, WanPipeline

    from worker.tiny_models import build_tiny_ltx, build_tiny_wan_t2v

    folder = Path(tempfile.mkdtemp(prefix="bench-tiny-"))
    if family == "ltx":
        return LTXPipeline.from_pretrained(build_tiny_ltx(folder / "ltx", num_layers=layers), dtype=dtype).to(device)
    return WanPipeline.from_pretrained(build_tiny_wan_t2v(folder / "wan"), dtype=dtype).to(device)


def job_params(family: str, size: tuple[int, int, int], steps: int) -> GenerationParams:
    width, height, frames = size
    return GenerationParams(
        prompt=PROMPT,
        model=f"bench-{family}",
        num_frames=frames,
        width=width,
        height=height,
        fps=24,
        num_inference_steps=steps,
        guidance_scale=3.0,
        seed=0,
    )


def bare_call(pipe: Any, family: str, p: GenerationParams) -> Any:
    """What a user of diffusers writes, without any of the service around it."""
    extra = {"frame_rate": p.fps} if family == "ltx" else {}
    return pipe(
        prompt=p.prompt,
        width=p.width,
        height=p.height,
        num_frames=p.num_frames,
        num_inference_steps=p.num_inference_steps,
        guidance_scale=p.guidance_scale,
        generator=torch.Generator(device="cpu").manual_seed(p.seed),
        output_type="np",
        **extra,
    ).frames[0]


def timed(fn, device: torch.device) -> float:
    sync(device)
    started = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - started


def parse_size(text: str) -> tuple[int, int, int]:
    try:
        width, height, frames = (int(n) for n in text.split("x"))
    except ValueError:
        raise ValueError(f"{text!r} is not a size WxHxF") from None
    return width, height, frames


def fit_frames(family: str, size: tuple[int, int, int]) -> tuple[int, int, int]:
    """The frame count the model takes at or below the one asked (LTX: 8k+1, Wan: 4k+1)."""
    width, height, frames = size
    step = 8 if family == "ltx" else 4
    return width, height, (frames - 1) // step * step + 1


def parse_configs(text: str, default_repeats: int) -> list[tuple[str, list[tuple[int, int, int]], int]]:
    """`name[@WxHxF+WxHxF][*repeats]`, comma-separated: each configuration with the sizes it runs
    at (none: all the run's sizes) and its repeats (else `default_repeats`). ValueError names what
    is wrong."""
    configs = []
    for entry in text.split(","):
        entry, star, repeats_text = entry.strip().partition("*")
        name, _, sizes = entry.partition("@")
        if name not in CONFIGS:
            raise ValueError(f"unknown configuration {name!r} (known: {', '.join(CONFIGS)})")
        if name == "eager" and configs and any(c != "eager" for c, _, _ in configs):
            raise ValueError("eager must come before the others: compilation cannot be undone")
        repeats = int(repeats_text) if star and repeats_text.isdigit() else -1 if star else default_repeats
        if repeats < 1:
            raise ValueError(f"{entry}*{repeats_text}: repeats must be a whole number of at least 1")
        configs.append((name, [parse_size(size) for size in sizes.split("+") if size], repeats))
    return configs


def run_family(family: str, args: argparse.Namespace, device: torch.device, results: dict) -> None:
    from torch._dynamo.utils import counters

    counters.clear()  # torch.compile's tally, per family
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    started = time.perf_counter()
    if args.tiny:
        pipe = tiny_pipeline(family, device, dtype, args.tiny_layers)
    else:
        pipe = real_pipeline(family, device, dtype)
    pipe.set_progress_bar_config(disable=True)
    build_s = time.perf_counter() - started
    runner = ModelRunner(spec_for(family), pipe, device)
    params_b = sum(p.numel() for p in pipe.transformer.parameters()) / 1e9
    print(
        json.dumps({"family": family, "transformer_params_b": round(params_b, 3), "build_s": round(build_s, 1)}),
        flush=True,
    )
    sizes = [(64, 64, 9)] if args.tiny else SIZES
    if args.sizes:
        sizes = [parse_size(size) for size in args.sizes.split(",")]
    elif family == "wan" and not args.tiny:
        sizes = sizes[: args.wan_sizes]
    sizes = [fit_frames(family, size) for size in sizes]
    eager_bare: dict[tuple[int, int, int], float] = {}
    compiled = False
    pab_runner: ModelRunner | None = None
    eager_fast: ModelRunner | None = None
    # Eager first: compilation cannot be undone on a pipeline object.
    for config, only_sizes, repeats in args.parsed_configs:
        if config != "eager" and not compiled:  # as a worker compiles: whole blocks, a compiled call per tier
            runner.compile_blocks()
            compiled = True
        served_runner = runner
        config_sizes = [fit_frames(family, size) for size in only_sizes] if only_sizes else sizes
        config_args = argparse.Namespace(**{**vars(args), "repeats": repeats})
        if config in ("fast-eager", "after-fast-eager"):  # the registry's tier on eager blocks
            tier = load_registry().get(REGISTRY_MODEL[family]).speed.fast
            assert tier is not None
            eager_fast = ModelRunner(spec_for(family, tier.model_dump() | {"compiled": False}), pipe, device)
            eager_fast.compile_blocks(like=runner)
            served_runner = eager_fast if config == "fast-eager" else runner
        if config in ("fast-pab", "after-fast-pab"):  # one runner for both: a worker's with that tier
            if pab_runner is None:
                pab_runner = ModelRunner(spec_for(family, PAB_FAST), pipe, device)
                pab_runner.compile_blocks(like=runner)
            served_runner = pab_runner
        if config == "fast-wide":
            served_runner = ModelRunner(spec_for(family, WIDE_FAST), pipe, device)
            served_runner.compile_blocks(like=runner)
            if not only_sizes:
                config_sizes = (
                    sizes[-1:] if args.tiny or family == "wan" else [s for s in sizes if s == (768, 512, 121)]
                )
        for width, height, frames in config_sizes:
            if args.deadline and time.monotonic() > args.deadline:
                results["skipped"].append(f"{family} {config} {width}x{height}x{frames}: out of time")
                print(json.dumps({"skipped": results["skipped"][-1]}), flush=True)
                continue
            p = job_params(family, (width, height, frames), args.steps)
            served_p = {
                "eager": p,
                "compile": p,
                "fast": p.model_copy(update={"tier": "fast"}),
                "fast-wide": p.model_copy(update={"tier": "fast"}),
                "fast-pab": p.model_copy(update={"tier": "fast"}),
                "fast-eager": p.model_copy(update={"tier": "fast"}),
                "after-fast": p,
                "after-fast-eager": p,
                "after-fast-pab": p,
                # What a step-distilled checkpoint runs: 8 steps without classifier-free guidance.
                "fast-schedule": p.model_copy(update={"num_inference_steps": 8, "guidance_scale": 1.0}),
            }[config]
            try:
                if config.startswith("after-fast"):  # standard jobs once a fast job has run
                    fast_p = p.model_copy(update={"tier": "fast"})
                    fast_runner = {"after-fast-eager": eager_fast, "after-fast-pab": pab_runner}.get(config, runner)
                    assert fast_runner is not None
                    fast_runner.generate("text-to-video", fast_p, Inputs(), lambda k, n: None)
                row = measure(family, config, pipe, served_runner, p, served_p, config_args, device)
            except Exception as exc:  # one failing configuration must not cost the others' numbers
                import traceback

                traceback.print_exc()
                results["errors"].append(f"{family} {config} {width}x{height}x{frames}: {exc!r}"[:2000])
                Path(args.out).write_text(json.dumps(results, indent=1))
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            if config == "eager":
                eager_bare[(width, height, frames)] = row["bare_s"]
            if (width, height, frames) in eager_bare:
                row["speedup_vs_eager_bare"] = round(eager_bare[(width, height, frames)] / row["served_s"], 3)
            results["rows"].append(row)
            # torch.compile's own tally so far (graphs, frames traced): recompilation or eager fallback.
            results["dynamo"][family] = {kind: dict(counters[kind]) for kind in ("stats", "frames")}
            Path(args.out).write_text(json.dumps(results, indent=1))
            print(json.dumps(row), flush=True)
        if config == "compile" and args.overlap:
            size = (768, 512, 121) if (768, 512, 121) in sizes else sizes[-1]
            probe_overlap(family, runner, size, args, device, results)
        if config == "eager" and args.attention_backends:
            probe_attention(
                family, runner, pipe, sizes[-1] if family == "wan" or args.tiny else (768, 512, 121), args, results
            )
    del runner, pipe
    if device.type == "cuda":
        torch.cuda.empty_cache()


def probe_attention(
    family: str, runner: ModelRunner, pipe: Any, size: tuple[int, int, int], args: argparse.Namespace, results: dict
) -> None:
    """Seconds per denoising step (eager, served path) with each attention backend, then back to the default."""
    width, height, frames = size
    steps = 6
    p = job_params(family, size, steps)
    for backend in args.attention_backends.split(","):
        row: dict[str, Any] = {"family": family, "attention_backend": backend, "width": width, "height": height}
        row["num_frames"] = frames
        try:
            pipe.transformer.set_attention_backend(backend)
            runner.generate(
                "text-to-video", p.model_copy(update={"num_inference_steps": 2}), Inputs(), lambda k, n: None
            )
            per_step = []
            for _ in range(2):
                out = runner.generate("text-to-video", p, Inputs(), lambda k, n: None)
                per_step.append(out.denoise_s / steps)
            row["s_per_step"] = round(min(per_step), 4)
        except Exception as exc:
            row["error"] = repr(exc)[:500]
        results["attention"].append(row)
        print(json.dumps(row), flush=True)
    pipe.transformer.set_attention_backend("native")
    Path(args.out).write_text(json.dumps(results, indent=1))


def probe_overlap(
    family: str,
    runner: ModelRunner,
    size: tuple[int, int, int],
    args: argparse.Namespace,
    device: torch.device,
    results: dict,
) -> None:
    """A run of standard jobs, each generated then encoded on one thread, against the worker's order:
    generation on one thread while the previous job's frames are encoded on another."""
    from concurrent.futures import ThreadPoolExecutor

    p = job_params(family, size, args.steps)
    jobs = args.overlap

    def serial(tmp: Path) -> None:
        for index in range(jobs):
            out = runner.generate("text-to-video", p, Inputs(), lambda k, n: None)
            encode_mp4(out.frames, p.fps, tmp / f"{index}.mp4")

    def overlapped(tmp: Path) -> None:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode") as encoder:
            pending = []
            for index in range(jobs):
                out = runner.generate("text-to-video", p, Inputs(), lambda k, n: None)
                pending.append(encoder.submit(encode_mp4, out.frames, p.fps, tmp / f"{index}.mp4"))
            for future in pending:
                future.result()

    row: dict[str, Any] = {"family": family, "overlap_jobs": jobs, "width": size[0], "height": size[1]}
    row |= {"num_frames": size[2], "steps": args.steps}
    if args.deadline and time.monotonic() > args.deadline:
        results["skipped"].append(f"{family} overlap: out of time")
        return
    times: dict[str, list[float]] = {"serial": [], "overlapped": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for name, fn in (("serial", serial), ("overlapped", overlapped)):
                times[name].append(timed(functools.partial(fn, Path(tmp)), device))
    for name, values in times.items():
        row[f"{name}_jobs_per_s"] = round(jobs / statistics.median(values), 4)
    row["gain"] = round(statistics.median(times["serial"]) / statistics.median(times["overlapped"]), 4)
    results["overlap"].append(row)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(json.dumps(row), flush=True)


def measure(
    family: str,
    config: str,
    pipe: Any,
    runner: ModelRunner,
    p: GenerationParams,
    served_p: GenerationParams,
    args: argparse.Namespace,
    device: torch.device,
) -> dict[str, Any]:
    """Bare (as configured: eager or compiled) and served, alternating (and which goes first, by
    repeat); medians of `repeats`, and each call's time."""
    steps_seen: list[int] = []
    for warm in (p, served_p):  # warm-up: kernels, compilation for the shape, allocator
        short = warm.model_copy(update={"num_inference_steps": 2})
        runner.generate("text-to-video", short, Inputs(), lambda k, n: None)
    bare_call(pipe, family, p.model_copy(update={"num_inference_steps": 2}))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    bare, served, encode = [], [], []
    out = None
    for repeat in range(args.repeats):
        holder: dict[str, Any] = {}

        def serve(q=served_p, holder=holder, seen=steps_seen, runner=runner) -> None:
            holder["out"] = runner.generate("text-to-video", q, Inputs(), lambda k, n: seen.append(k))

        # Alternating which goes first, so that a slow spell of the host does not fall on one side.
        for side in ("bare", "served") if repeat % 2 == 0 else ("served", "bare"):
            if side == "bare":
                bare.append(timed(functools.partial(bare_call, pipe, family, p), device))
            else:
                served.append(timed(serve, device))
        out = holder["out"]
        with tempfile.TemporaryDirectory() as tmp:
            encode.append(timed(functools.partial(encode_mp4, out.frames, p.fps, Path(tmp) / "v.mp4"), device))
    bare_s, served_s, encode_s = statistics.median(bare), statistics.median(served), statistics.median(encode)
    # How many compiled graphs a bare (standard) call runs through now: 0 means it ran eagerly.
    short = functools.partial(bare_call, pipe, family, p.model_copy(update={"num_inference_steps": 2}))
    bare_frames = None if config == "eager" else len(compiled_graphs(short))
    return {
        "family": family,
        "config": config,
        "width": p.width,
        "height": p.height,
        "num_frames": p.num_frames,
        "steps": served_p.num_inference_steps,
        "repeats": args.repeats,  # timed calls of each, bare and served
        "guidance_scale": served_p.guidance_scale,
        "cache_used": runner.uses_cache("text-to-video", served_p),
        "bare_s": round(bare_s, 3),
        "served_s": round(served_s, 3),
        "encode_s": round(encode_s, 3),
        "served_over_bare": round(served_s / bare_s, 4),
        "bare_runs_s": [round(t, 3) for t in bare],  # each timed call: the spread behind the medians
        "served_runs_s": [round(t, 3) for t in served],
        "served_plus_encode_over_bare": round((served_s + encode_s) / bare_s, 4),
        "step_callbacks": len(steps_seen) // args.repeats,
        "frames_out": list(out.frames.shape),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        "bare_compiled_frames": bare_frames,  # the name of earlier runs: graphs, not frames
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny random models: a smoke test that runs on a CPU")
    parser.add_argument(
        "--tiny-layers",
        type=int,
        default=1,
        help="with --tiny, LTX's transformer blocks (28 as the real model: per-block costs on the host, as at "
        "small sizes on a GPU)",
    )
    parser.add_argument("--out", default="gpu-pipeline.json")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--families", default="ltx,wan")
    parser.add_argument("--wan-sizes", type=int, default=2, help="how many of the sizes to run for Wan (slow)")
    parser.add_argument(
        "--configs",
        default="eager,compile,fast,after-fast,fast-schedule",
        help="eager: both eager; compile: both with compiled repeated blocks; fast: served with the registry's "
        "fast tier (TaylorSeer in lite mode: blocks skipped on 4 steps in 5 after the first 3) on the compiled "
        "pipeline; after-fast: both standard and compiled, once a fast job has run; fast-schedule: served with a "
        "distilled checkpoint's 8 steps without guidance; fast-pab: served with PyramidAttentionBroadcast, the "
        "fast tier before; after-fast-pab: as after-fast, once a PyramidAttentionBroadcast fast job has run; fast-wide: PyramidAttentionBroadcast skipping more, at 768x512x121 only; fast-eager "
        "and after-fast-eager: as fast and after-fast with the fast tier on eager blocks (`compiled = false`). "
        "Each row also gives the speed-up over bare eager (measured in the same run). A configuration may "
        "name its own sizes and repeats: eager@256x256x17*5,fast@768x512x121+768x768x129. The blocks are "
        "compiled before the first configuration other than eager.",
    )
    parser.add_argument("--sizes", default="", help="WxHxF,...: these sizes instead of the defaults (both families)")
    parser.add_argument(
        "--attention-backends",
        default="",
        help="after the eager rows, seconds per step with each of these diffusers attention backends "
        "(e.g. native,_native_cudnn,_native_flash)",
    )
    parser.add_argument(
        "--overlap",
        type=int,
        default=0,
        help="after the compile rows, time this many standard jobs at 768x512x121 (else the last size), generated "
        "and encoded one after the other, against encoding each on a second thread while the next generates "
        "(the worker's order)",
    )
    parser.add_argument(
        "--budget-s", type=float, default=0, help="skip the measurements not started within this many seconds"
    )
    parser.add_argument(
        "--recompile-limit",
        type=int,
        default=0,
        help="torch.compile's limit of compiled variants per function, after which it runs the function eagerly "
        "(torch's default when 0: 8)",
    )
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats: at least 1")
    try:  # before any model is built: a mistake here must not cost minutes
        args.parsed_configs = parse_configs(args.configs, args.repeats)
        for size in filter(None, args.sizes.split(",")):
            parse_size(size)
    except ValueError as exc:
        parser.error(f"--configs/--sizes: {exc}")
    if args.recompile_limit:
        torch._dynamo.config.recompile_limit = args.recompile_limit
        torch._dynamo.config.accumulated_recompile_limit = max(
            torch._dynamo.config.accumulated_recompile_limit, 8 * args.recompile_limit
        )
    args.deadline = time.monotonic() + args.budget_s if args.budget_s else 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    import diffusers

    results: dict[str, Any] = {
        "what": "served (worker ModelRunner.generate) vs bare diffusers call, same pipeline object, alternating; "
        "per speed configuration",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "tiny": args.tiny,
        "tiny_layers": args.tiny_layers if args.tiny else None,
        "steps": args.steps,
        "repeats": args.repeats,
        "recompile_limit": torch._dynamo.config.recompile_limit,
        "rows": [],
        "attention": [],
        "overlap": [],
        "dynamo": {},
        "skipped": [],
        "errors": [],
    }
    for family in args.families.split(","):
        try:
            run_family(family, args, device, results)
        except Exception as exc:  # keep the other family's numbers
            import traceback

            traceback.print_exc()
            results["errors"].append(f"{family}: {exc!r}")
            Path(args.out).write_text(json.dumps(results, indent=1))
    Path(args.out).write_text(json.dumps(results, indent=1))
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
