"""The model registry: which models exist, where their weights come from, what they accept."""

from __future__ import annotations

import json
import secrets
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from schemas.cost import CostModel
from schemas.errors import shown
from schemas.jobs import GenerationMode, GenerationParams
from schemas.requests import MAX_SEED

Family = Literal["ltx", "wan"]

# (size multiple, frame step): LTX needs /32 and 8k+1 frames, Wan /16 and 4k+1 frames.
FAMILY_RULES: dict[str, tuple[int, int]] = {"ltx": (32, 8), "wan": (16, 4)}

# The diffusers pipeline class of each family and mode (a model's `pipeline` may replace its first mode's).
PIPELINE_CLASSES: dict[tuple[str, str], str] = {
    ("ltx", "text-to-video"): "LTXPipeline",
    ("ltx", "image-to-video"): "LTXImageToVideoPipeline",
    ("ltx", "video-to-video"): "LTXConditionPipeline",
    ("wan", "text-to-video"): "WanPipeline",
    ("wan", "image-to-video"): "WanImageToVideoPipeline",
    ("wan", "video-to-video"): "WanVideoToVideoPipeline",
}
# Caches that keep their state per diffusers cache context (one per classifier-free-guidance branch),
# and the pipelines above that call the transformer without naming one: those caches fail there on
# every job. tests/unit/test_pipelines.py checks this set against diffusers' sources.
CONTEXT_CACHES = frozenset({"first_block", "taylorseer"})
PIPELINES_WITHOUT_CACHE_CONTEXTS = frozenset({"WanVideoToVideoPipeline"})
# The step options of diffusers' TaylorSeerCacheConfig, with its defaults.
TAYLORSEER_STEPS = {"disable_cache_before_step": 3, "cache_interval": 5, "disable_cache_after_step": None}


class ModelDefaults(BaseModel):
    model_config = ConfigDict(extra="forbid")
    width: int
    height: int
    num_frames: int
    num_inference_steps: int
    guidance_scale: float
    fps: int | None = None
    strength: float = Field(default=0.8, gt=0.0, le=1.0)


CacheKind = Literal["pyramid_attention_broadcast", "first_block", "taylorseer"]


class FastTier(BaseModel):
    """The `fast` tier: a diffusers cache (`enable_cache`) on the transformer, fresh for every job."""

    model_config = ConfigDict(extra="forbid")
    cache: CacheKind
    options: dict[str, Any] = Field(default_factory=dict, description="Arguments of the cache's config.")
    min_video_mpx: float = Field(
        default=0.0,
        ge=0.0,
        description="Videos smaller than this (width x height x frames, in millions) run without the cache: "
        "where it measured slower than the compiled blocks alone, the fast tier runs as the standard one.",
    )
    compiled: bool = Field(
        default=True,
        description="With the model's `compile`: run fast jobs on compiled blocks (a compiled call of "
        "their own); false: on eager blocks, so that no graph traced around the cache's hooks exists.",
    )
    modes: list[GenerationMode] | None = Field(
        default=None,
        min_length=1,
        description="The modes it serves (default: all the model's). A cache that keeps state per "
        "classifier-free-guidance branch (TaylorSeer) needs a pipeline that names them with diffusers' "
        "cache contexts; the others' fast jobs are refused.",
    )

    @model_validator(mode="after")
    def _check_options(self) -> FastTier:
        if self.cache == "taylorseer":
            # Step 0 must run the blocks (there is nothing to extrapolate from yet), and an interval
            # below 1 has no next full step.
            for name, least in (
                ("disable_cache_before_step", 1),
                ("cache_interval", 1),
                ("disable_cache_after_step", 0),
            ):
                value = self._step_option(name)
                if name == "disable_cache_after_step" and value is None:
                    continue
                if not isinstance(value, int) or isinstance(value, bool) or value < least:
                    raise ValueError(f"fast tier: TaylorSeer's `{name}` must be an integer of at least {least}")
        return self

    def _step_option(self, name: str) -> Any:
        return self.options.get(name, TAYLORSEER_STEPS[name])

    def covers(self, mode: str) -> bool:
        return self.modes is None or mode in self.modes

    def warmup_steps(self) -> int:
        """Steps a warm-up job needs to take each of the cache's paths, so that no job compiles one:
        TaylorSeer's full steps, its first cached step and the full one after it; else 2."""
        if self.cache == "taylorseer":
            return self._step_option("disable_cache_before_step") + 2
        return 2

    def transformer_steps(self, steps: int) -> int:
        """Of `steps` denoising steps, how many run the transformer blocks. TaylorSeer in lite mode
        skips them all on its cached steps, by diffusers' rule: every step before
        `disable_cache_before_step`, then one in `cache_interval`, and every step from
        `disable_cache_after_step` on. Other caches skip part of a step's work only: all count."""
        if self.cache != "taylorseer" or not self.options.get("use_lite_mode", False):
            return steps
        before, interval, after = (self._step_option(name) for name in TAYLORSEER_STEPS)
        return sum(
            1
            for step in range(steps)
            if step < before or (step - before - 1) % interval == 0 or (after is not None and step >= after)
        )


class SpeedConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    compile: bool = Field(default=False, description="torch.compile the transformer's repeated blocks.")
    warmup: list[tuple[int, int, int]] = Field(
        default_factory=list, description="(width, height, frames) run at start, so no job pays the compile."
    )
    attention_backend: str | None = Field(default=None, description="diffusers attention backend, e.g. 'flash'.")
    fast: FastTier | None = None


class ModelLimits(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_size: int = 32
    max_width: int
    max_height: int
    max_frames: int
    max_steps: int = 100


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    family: Family
    description: str = ""
    repo: str | None = None
    revision: str | None = None
    path: str | None = None
    native_fps: int
    modes: list[GenerationMode] = Field(min_length=1, description="The first is the mode its weights load as.")
    defaults: ModelDefaults
    limits: ModelLimits
    size_multiple: int | None = None
    frame_step: int | None = None
    max_queue_depth: int = Field(
        default=1000, ge=1, description="With this many jobs waiting, new ones are refused (503) until it drains."
    )
    max_queue_s: int = Field(
        default=3600, ge=1, description="A job waiting longer than this for a worker fails with code `expired`."
    )
    pipeline: str | None = Field(
        default=None, description="diffusers class of the first mode, when not the family's usual one."
    )
    call_args: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra pipeline arguments, e.g. a distilled checkpoint's `timesteps` and decode settings.",
    )
    speed: SpeedConfig = Field(default_factory=SpeedConfig)
    cost: CostModel | None = Field(
        default=None, description="Memory and time coefficients for the preflight estimate (schemas/cost.py)."
    )

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if (self.repo is None) == (self.path is None):
            raise ValueError(f"model {self.id!r}: set exactly one of `repo` or `path`")
        fast = self.speed.fast
        if fast is not None and fast.modes is not None and not set(fast.modes) <= set(self.modes):
            raise ValueError(f"model {self.id!r}: the fast tier's `modes` must be among the model's {self.modes}")
        if fast is not None and fast.cache in CONTEXT_CACHES:
            for mode in self.modes:
                pipeline = (self.pipeline if mode == self.modes[0] else None) or PIPELINE_CLASSES[(self.family, mode)]
                if fast.covers(mode) and pipeline in PIPELINES_WITHOUT_CACHE_CONTEXTS:
                    raise ValueError(
                        f"model {self.id!r}: the fast tier's cache {fast.cache!r} needs diffusers' cache contexts, "
                        f"which {pipeline} ({mode}) does not set; list the modes it serves in the fast tier's `modes`"
                    )
        multiple, step = FAMILY_RULES[self.family]
        self.size_multiple = self.size_multiple or multiple
        self.frame_step = self.frame_step or step
        return self

    def uses_fast_cache(self, mode: str, params: Any) -> bool:
        """Whether a job (its mode and GenerationParams) runs with the fast tier's cache: asked for,
        in a mode the tier serves, and large enough."""
        fast = self.speed.fast
        if params.tier != "fast" or fast is None or not fast.covers(mode):
            return False
        return params.width * params.height * params.num_frames / 1e6 >= fast.min_video_mpx

    def transformer_steps(self, mode: str, params: Any) -> int:
        """How many denoising steps of a job run the transformer blocks: those the pipeline runs
        (video-to-video: `int(steps x strength)`, as both families' pipelines do), but a fast job's
        cached ones."""
        steps = params.num_inference_steps
        if params.strength is not None:  # set for video-to-video only
            steps = min(steps, int(steps * params.strength))
        return self.speed.fast.transformer_steps(steps) if self.uses_fast_cache(mode, params) else steps

    def source(self, models_dir: Path) -> str:
        """What `from_pretrained` takes: a hub id or a local folder."""
        if self.repo is not None:
            return self.repo
        path = Path(self.path)
        return str(path if path.is_absolute() else models_dir / path)


class FieldProblem(BaseModel):
    field: str
    rule: str
    message: str


class Registry(BaseModel):
    default_model: str
    models: dict[str, ModelSpec]

    @model_validator(mode="after")
    def _check_default(self) -> Registry:
        if self.default_model not in self.models:
            raise ValueError(f"default_model {self.default_model!r} is not in the registry")
        return self

    def get(self, model_id: str) -> ModelSpec | None:
        return self.models.get(model_id)

    def unknown(self, model_id: str) -> str:
        """The message for a model id not in the registry, with the ids that are."""
        return f"unknown model {shown(model_id)}; known models: {', '.join(sorted(self.models))}"

    def resolve(self, request: Any, mode: GenerationMode) -> tuple[GenerationParams | None, list[FieldProblem]]:
        """Fill a request's unset fields from its model's defaults and check the model's rules."""
        model_id = request.model or self.default_model
        spec = self.models.get(model_id)
        if spec is None:
            return None, [FieldProblem(field="model", rule="known_model", message=self.unknown(model_id))]
        if mode not in spec.modes:
            return None, [
                FieldProblem(
                    field="model",
                    rule="supports_mode",
                    message=f"model {model_id!r} does not support {mode}; it supports {', '.join(spec.modes)}",
                )
            ]
        d = spec.defaults
        values = {
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt,
            "model": model_id,
            "num_frames": _pick(request.num_frames, d.num_frames),
            "width": _pick(request.width, d.width),
            "height": _pick(request.height, d.height),
            "fps": _pick(request.fps, d.fps or spec.native_fps),
            "num_inference_steps": _pick(request.num_inference_steps, d.num_inference_steps),
            "guidance_scale": _pick(request.guidance_scale, d.guidance_scale),
            # An unset seed is drawn here and recorded, so every job can be reproduced.
            "seed": secrets.randbelow(MAX_SEED + 1) if request.seed is None else request.seed,
            "strength": _pick(request.strength, d.strength) if mode == "video-to-video" else None,
            "priority": request.priority or "normal",
            "tier": request.tier or "standard",
        }
        fixed = spec.call_args.get("timesteps")
        if fixed is not None:
            # A distilled checkpoint runs its own schedule: the step count is the schedule's.
            if request.num_inference_steps not in (None, len(fixed)):
                return None, [
                    FieldProblem(
                        field="num_inference_steps",
                        rule="fixed_by_model",
                        message=f"num_inference_steps: model {model_id!r} runs a fixed schedule of {len(fixed)} steps",
                    )
                ]
            values["num_inference_steps"] = len(fixed)
        if values["tier"] == "fast" and (spec.speed.fast is None or not spec.speed.fast.covers(mode)):
            modes = spec.speed.fast.modes if spec.speed.fast is not None else None
            message = f"tier: model {model_id!r} has no fast tier" + (
                f" for {mode} (only for {', '.join(modes)})" if modes is not None else ""
            )
            return None, [FieldProblem(field="tier", rule="fast_tier_available", message=message)]
        problems = check_rules(spec, values)
        if problems:
            return None, problems
        return GenerationParams(**values), []


def _pick(value: Any, default: Any) -> Any:
    return default if value is None else value


def check_rules(spec: ModelSpec, v: dict[str, Any]) -> list[FieldProblem]:
    problems: list[FieldProblem] = []
    lim, m, step = spec.limits, spec.size_multiple, spec.frame_step
    for field, upper in (("width", lim.max_width), ("height", lim.max_height)):
        value = v[field]
        if value % m:
            lower = min(upper, max(lim.min_size, value // m * m))
            higher = min(upper, lower + m) if value > lower else lower
            problems.append(
                FieldProblem(
                    field=field,
                    rule=f"multiple_of_{m}",
                    message=f"{field} must be a multiple of {m} for model {spec.id!r}, got {value}; "
                    f"nearest valid values: {_nearest(lower, higher)}",
                )
            )
        if not lim.min_size <= value <= upper:  # both rules are named when both are broken
            problems.append(
                FieldProblem(
                    field=field,
                    rule="range",
                    message=f"{field} must be between {lim.min_size} and {upper} for model {spec.id!r}, got {value}",
                )
            )
    frames = v["num_frames"]
    if (frames - 1) % step:
        top = _max_frames(spec)
        lower = min((frames - 1) // step * step + 1, top)
        higher = min(lower + step, top)
        problems.append(
            FieldProblem(
                field="num_frames",
                rule=f"{step}k+1",
                message=f"num_frames must be {step}k+1 for model {spec.id!r} (e.g. {step + 1}, {2 * step + 1}), "
                f"got {frames}; nearest valid values: {_nearest(lower, higher)}",
            )
        )
    if frames > lim.max_frames:
        problems.append(
            FieldProblem(
                field="num_frames",
                rule="maximum",
                message=f"num_frames must be at most {lim.max_frames} for model {spec.id!r}, got {frames}",
            )
        )
    if v.get("strength") is not None and int(v["num_inference_steps"] * v["strength"]) < 1:
        problems.append(
            FieldProblem(
                field="strength",
                rule="denoising_steps",
                message=f"strength {v['strength']} with num_inference_steps {v['num_inference_steps']} leaves no "
                f"denoising step (video-to-video runs int(num_inference_steps * strength) steps); raise one "
                f"of them",
            )
        )
    if v["num_inference_steps"] > lim.max_steps:
        problems.append(
            FieldProblem(
                field="num_inference_steps",
                rule="maximum",
                message=f"num_inference_steps must be at most {lim.max_steps} for model {spec.id!r}, "
                f"got {v['num_inference_steps']}",
            )
        )
    return problems


def _max_frames(spec: ModelSpec) -> int:
    step = spec.frame_step
    return (spec.limits.max_frames - 1) // step * step + 1


def _nearest(lower: int, higher: int) -> str:
    return str(lower) if lower == higher else f"{lower} or {higher}"


def load_registry(
    models_file: Path | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    default_model: str | None = None,
) -> Registry:
    """Read the registry file (the built-in one unless `models_file`), then apply overrides."""
    if models_file is None:
        raw = tomllib.loads(resources.files("schemas").joinpath("models.toml").read_text())
    else:
        raw = tomllib.loads(Path(models_file).read_text())
    models: dict[str, dict[str, Any]] = raw.get("models", {})
    for model_id, patch in (overrides or {}).items():
        models[model_id] = _merge(models.get(model_id, {}), patch)
    specs = {}
    for model_id, entry in models.items():
        try:
            specs[model_id] = ModelSpec(id=model_id, **entry)
        except ValidationError as exc:  # a ValueError that names the model and each field
            raise ValueError(f"model {model_id!r}: {problems_of(exc)}") from None
        except TypeError:
            raise ValueError(f"model {model_id!r}: must be a table of settings, not {entry!r}") from None
    if not specs:
        raise ValueError("no models")
    default = default_model or raw.get("default_model") or next(iter(specs))
    if default not in specs:
        raise ValueError(f"default_model {default!r} is not in the registry; known: {', '.join(sorted(specs))}")
    return Registry(default_model=default, models=specs)


def problems_of(exc: ValidationError) -> str:
    """A validation error's problems in one line: each field's path, rule and value."""
    parts = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"])
        value = error.get("input")
        given = f" (got {shown(value) if isinstance(value, str) else repr(value)[:80]})" if where else ""
        parts.append(f"{where + ': ' if where else ''}{error['msg']}{given}")
    return "; ".join(parts)


def _merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    if "repo" in patch and patch["repo"] is not None:
        out.pop("path", None)
    if "path" in patch and patch["path"] is not None:
        out.pop("repo", None)
    return out


def parse_overrides(text: str) -> dict[str, dict[str, Any]]:
    return json.loads(text) if text.strip() else {}
