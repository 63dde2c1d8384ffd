"""Settings shared by the gateway and the workers. Each process has one class, env prefix VIDEOGEN_."""

from __future__ import annotations

import json
import os
import re
import sys
import tomllib
import urllib.parse
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError

from schemas.registry import Registry, load_registry


def check_endpoint(url: str) -> None:
    """`url` names a host and, optionally, a port, and nothing else (no user, path, query or
    fragment: the store client would refuse or drop them); ValueError otherwise."""
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = 0
    if not parts.hostname:
        raise ValueError("must name a host")
    if port == 0:
        raise ValueError("has a port that is not a number from 1 to 65535")
    if parts.username is not None or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("must be only a host and a port (no user, path, query or fragment)")


def check_rate_limit(value: str) -> str:
    """A rate limit in the `limits` library's notation, one limit of at least one request
    ("20/second", "600/minute"); ValueError otherwise (`limits` would keep only the first of
    several, and a limit of 0 refuses every request)."""
    from limits import parse_many

    try:
        items = parse_many(value)
    except ValueError:
        raise ValueError("must be a rate such as '20/second' or '600/minute'") from None
    if len(items) != 1:
        raise ValueError("must be one rate such as '20/second', not several")
    if items[0].amount < 1:
        raise ValueError("must allow at least 1 request")
    return value


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# What a broker namespace may be made of (VIDEOGEN_BROKER_NAMESPACE; `scripts/stack up --namespace`).
NAMESPACE_PATTERN = r"^[A-Za-z0-9_.-]+$"


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VIDEOGEN_", extra="ignore")

    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    broker_namespace: str = Field(
        default="videogen", pattern=NAMESPACE_PATTERN, description="Prefix of every exchange and queue name."
    )
    s3_endpoint: str = Field(default="127.0.0.1:9000", description="host:port of the S3 API.")
    s3_secure: bool = False
    s3_region: str = "us-east-1"
    s3_access_key: str = "videogen"
    s3_secret_key: SecretStr = SecretStr("videogen-secret")
    s3_bucket: str = "videogen"
    s3_timeout_s: float = Field(
        default=10.0, gt=0, description="How long a store call waits for the store to answer before it fails."
    )
    models_file: Path | None = None
    model_overrides: dict[str, dict[str, Any]] = Field(default_factory=dict)
    default_model: str | None = None
    models_dir: Path = Path("models")
    log_level: str = Field(default="INFO", description="DEBUG, INFO, WARNING, ERROR or CRITICAL (any case).")
    log_format: Literal["auto", "json", "console"] = "auto"

    def registry(self) -> Registry:
        return load_registry(self.models_file, self.model_overrides, self.default_model)

    @field_validator("s3_endpoint")
    @classmethod
    def _host_and_port(cls, value: str) -> str:
        if "://" in value:
            raise ValueError("must be host:port, without a scheme (VIDEOGEN_S3_SECURE=true for HTTPS)")
        check_endpoint(f"//{value}")
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        if value.upper() not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
        return value.upper()


class GatewaySettings(CommonSettings):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    s3_public_endpoint: str | None = Field(
        default=None,
        description="URL clients use to reach the store (presigned links are bound to it); "
        "defaults to the S3 endpoint.",
    )
    presign_expiry_s: int = Field(default=3600, ge=1, le=7 * 24 * 3600)
    request_timeout_s: float = Field(
        default=300.0, gt=0, description="Longest a request (other than a stream) may take: then 504."
    )
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024, description="Limit for JSON bodies without files.")
    max_upload_bytes: int = Field(
        default=100 * 1024 * 1024,
        ge=1024,
        description="Limit for an uploaded image or video (multipart, or base64 in JSON).",
    )
    max_concurrent_uploads: int = Field(
        default=3,
        ge=1,
        description="Submissions that may carry a file (a body larger than max_body_bytes, or of unknown "
        "length) read and held at once; more wait up to 30 s for their turn, then 503 uploads_busy.",
    )
    max_streams_per_key: int = Field(
        default=100,
        ge=1,
        description="WebSocket and SSE streams one API key may hold open on one gateway at once; more get "
        "429 too_many_streams until one closes.",
    )
    max_image_pixels: int = Field(default=4096 * 4096, ge=1)
    max_video_frames: int = Field(default=1000, ge=1)
    max_video_seconds: float = Field(default=120.0, gt=0)
    max_video_side: int = Field(default=4096, ge=16)
    cors_allow_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["*"], description="Origins browsers may call the API from; '*' any, empty none."
    )
    download_max_queue_s: int = Field(
        default=24 * 3600,
        ge=1,
        description="A model download that no worker has started after this many seconds fails with code `expired`.",
    )
    idempotency_window_s: int = Field(
        default=24 * 3600, ge=1, description="How long an Idempotency-Key returns its original job."
    )
    webhook_secret: SecretStr | None = Field(
        default=None, description="Standard Webhooks signing secret (whsec_<base64>); unset disables webhooks."
    )
    webhook_allow_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Hosts, IPs or CIDRs webhooks may reach even if private or loopback."
    )
    gpu_memory_gib: float = Field(
        default=80.0,
        gt=0,
        description="GPU memory of the workers: jobs that cannot fit it even with group offload "
        "are refused (422); the 202's estimate is made for it.",
    )
    output_retention_days: int | None = Field(
        default=None,
        ge=1,
        description="Jobs (records, inputs, videos) and their index entries expire after this "
        "many days: a bucket lifecycle rule set at start. Unset: kept.",
    )
    auth_disabled: bool = Field(default=False, description="Serve without API keys (local development only).")
    api_keys_file: Path | None = Field(default=None, description="TOML file of API keys (see gateway/auth.py).")
    rate_limit: str = Field(default="20/second", description="Requests per key, e.g. '20/second', '600/minute'.")
    max_concurrent_jobs: int = Field(default=8, ge=1, description="Queued plus running jobs per key.")
    webhook_max_attempts: int = Field(default=8, ge=1)
    webhook_concurrency: int = Field(
        default=50, ge=1, le=1000, description="Webhook attempts one gateway makes at the same time."
    )
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    webhook_per_receiver: int = Field(
        default=10,
        ge=1,
        description="Of those attempts, at most this many to one receiver (host and port) at a time; "
        "its other events wait in the broker meanwhile, so a slow receiver cannot hold every slot.",
    )

    @field_validator("s3_public_endpoint")
    @classmethod
    def _public_url(cls, value: str | None) -> str | None:
        if value:
            url = value if "://" in value else f"http://{value}"
            if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
                raise ValueError("must be an http:// or https:// URL, or host:port for HTTP")
            check_endpoint(url)
        return value

    @field_validator("rate_limit")
    @classmethod
    def _rate_parses(cls, value: str) -> str:
        return check_rate_limit(value)

    @field_validator("webhook_secret")
    @classmethod
    def _secret_decodes(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            from standardwebhooks import Webhook

            try:
                Webhook(value.get_secret_value())
            except Exception:
                raise ValueError("must be a non-empty key in base64, optionally after whsec_") from None
        return value

    @field_validator("api_keys_file", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        # An empty value names no file (as a path it would be the current directory).
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("webhook_allow_hosts", "cors_allow_origins", mode="before")
    @classmethod
    def _split_hosts(cls, value: Any) -> Any:
        return _split_commas(value)


class WorkerSettings(CommonSettings):
    serve_models: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["ltx-video"])
    device: str = Field(
        default="auto", description="auto (CUDA if there is one, else the CPU), or a torch device: cpu, cuda, cuda:1."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    worker_id: str | None = None
    health_host: str = "127.0.0.1"
    health_port: int = Field(
        default=8081, ge=0, le=65535, description="HTTP port for /health and /ready; 0 disables it."
    )
    store_patience_s: float = Field(
        default=300.0,
        ge=0,
        description="How long a worker holding a job retries the object store before it hands the job back.",
    )
    gpu_memory_gib: float | None = Field(
        default=None,
        gt=0,
        description="Memory the preflight plans jobs for; default: the CUDA device's total "
        "(none on a CPU, where every job runs resident).",
    )
    compile: bool = Field(
        default=True, description="Compile models whose registry entry asks for it (false: never, e.g. to start fast)."
    )
    idle_poll_s: float = Field(
        default=1.0,
        gt=0,
        description="How often an idle worker looks for jobs that came without a `JobAvailable` notice.",
    )
    shutdown_grace_s: float = Field(
        default=60.0, ge=0, description="On SIGTERM, how long the current job may run on before it is requeued."
    )
    lower_priority_every: int = Field(
        default=4,
        ge=0,
        description="Every N-th job a worker takes, it looks below `high` first, and every N²-th at `low` "
        "first, so lower priorities are never starved; 0: always the highest priority first.",
    )

    @field_validator("serve_models", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return _split_commas(value)

    @field_validator("device")
    @classmethod
    def _a_device(cls, value: str) -> str:
        if value == "auto":
            return value
        import torch

        try:
            torch.device(value)
        except RuntimeError:
            raise ValueError("must be auto or a torch device such as cpu, cuda or cuda:1") from None
        return value

    @field_validator("lower_priority_every")
    @classmethod
    def _not_one(cls, value: int) -> int:
        if value == 1:  # every job would start at `low`: the priorities the wrong way round
            raise ValueError("must be 0 (always the highest priority first) or at least 2")
        return value


def _split_commas(value: Any) -> Any:
    """Lists in the environment are comma-separated."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


S = TypeVar("S", bound=CommonSettings)


def arguments_or_exit(cls: type[CommonSettings], program: str, argv: list[str]) -> None:
    """The processes take no arguments, only VIDEOGEN_* environment variables: `-h`/`--help` lists
    those (with defaults and meanings) and exits 0; anything else is refused with exit status 2,
    rather than ignored by a process that then starts with other settings than meant."""
    if not argv:
        return
    if argv[0] in ("-h", "--help"):
        print(f"usage: {program}  (no arguments; settings are environment variables, see README.md)\n")
        for name, field in cls.model_fields.items():
            default = "a secret" if "secret" in name else field.get_default(call_default_factory=True)
            shown = "unset" if default is None else json.dumps(default, default=str)
            print(f"VIDEOGEN_{name.upper()}  (default {shown})")
            if field.description:
                print(f"    {field.description}")
        sys.exit(0)
    print(
        f"{program}: takes no arguments (got {' '.join(argv)!r}); it is configured with VIDEOGEN_* environment "
        f"variables: {program} --help lists them",
        file=sys.stderr,
    )
    sys.exit(2)


def settings_or_exit(cls: type[S], program: str) -> S:
    """The process's settings from the environment, and the model registry they make; a bad one
    ends the process with one line per problem, naming the variable (`videogen-gateway:
    VIDEOGEN_PORT: ...`), and exit status 2."""
    try:
        settings = cls()
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            name = "VIDEOGEN_" + "_".join(str(part) for part in error["loc"]).upper()
            given = "a value, not shown" if "SECRET" in name else repr(error.get("input"))
            print(f"{program}: {name}: {error['msg']} (got {given})", file=sys.stderr)
        sys.exit(2)
    except SettingsError as exc:  # a value that must be JSON is not
        field = re.search(r'field "(\w+)"', str(exc))
        name = "VIDEOGEN_" + (field.group(1).upper() if field else "?")
        print(
            f"{program}: {name}: must be JSON: {exc.__cause__ or exc} (got {os.environ.get(name)!r})", file=sys.stderr
        )
        sys.exit(2)
    if (problem := registry_problem(settings)) is not None:
        print(f"{program}: {problem}", file=sys.stderr)
        sys.exit(2)
    return settings


def registry_problem(settings: CommonSettings) -> str | None:
    """Why the registry these settings make cannot load, naming the setting to change; None if it loads."""
    try:
        settings.registry()
    except (OSError, tomllib.TOMLDecodeError) as exc:
        return f"VIDEOGEN_MODELS_FILE: cannot read {str(settings.models_file)!r}: {exc}"
    except ValueError as exc:
        return f"{_registry_source(settings, exc)}: {exc}"
    return None


def _registry_source(settings: CommonSettings, exc: Exception) -> str:
    """The setting a registry error comes from: the default model, the overrides or the file."""
    if settings.default_model is not None and f"default_model {settings.default_model!r}" in str(exc):
        return "VIDEOGEN_DEFAULT_MODEL"
    sources = ["VIDEOGEN_MODEL_OVERRIDES"] if settings.model_overrides else []
    if settings.models_file is not None:
        sources.append("VIDEOGEN_MODELS_FILE")
    return " or ".join(sources) or "the built-in registry"
