from __future__ import annotations

import os

import pytest

from common.settings import GatewaySettings, WorkerSettings


def test_env_prefix_and_lists(monkeypatch) -> None:
    monkeypatch.setenv("VIDEOGEN_SERVE_MODELS", "ltx-tiny, wan2-1-t2v-1-3b")
    monkeypatch.setenv("VIDEOGEN_S3_BUCKET", "b")
    monkeypatch.setenv("VIDEOGEN_MODEL_OVERRIDES", '{"ltx-video": {"path": "/w/ltx"}}')
    settings = WorkerSettings()
    assert settings.serve_models == ["ltx-tiny", "wan2-1-t2v-1-3b"]
    assert settings.s3_bucket == "b"
    assert settings.registry().get("ltx-video").path == "/w/ltx"


def test_gateway_defaults(monkeypatch) -> None:
    monkeypatch.setenv("VIDEOGEN_DEFAULT_MODEL", "ltx-tiny")
    settings = GatewaySettings()
    assert (settings.host, settings.port) == ("127.0.0.1", 8080)
    assert settings.registry().default_model == "ltx-tiny"


@pytest.mark.parametrize(
    ("module", "program", "variable", "value"),
    [
        ("gateway.main", "videogen-gateway", "VIDEOGEN_DOWNLOAD_MAX_QUEUE_S", "0"),
        ("gateway.main", "videogen-gateway", "VIDEOGEN_PORT", "abc"),
        ("gateway.main", "videogen-gateway", "VIDEOGEN_RATE_LIMIT", "0/second"),
        ("gateway.main", "videogen-gateway", "VIDEOGEN_RATE_LIMIT", "20/second;100/minute"),
        ("worker.main", "videogen-worker", "VIDEOGEN_IDLE_POLL_S", "0"),
    ],
)
def test_a_bad_setting_stops_the_process_with_one_line_naming_it(module, program, variable, value) -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("VIDEOGEN_")} | {variable: value}
    done = subprocess.run([sys.executable, "-m", module], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()  # no traceback
    assert line.startswith(f"{program}: {variable}: ") and repr(value) in line


@pytest.mark.parametrize(
    ("module", "program"), [("gateway.main", "videogen-gateway"), ("worker.main", "videogen-worker")]
)
def test_help_lists_the_variables_and_other_arguments_are_refused(module, program) -> None:
    import subprocess
    import sys

    helped = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith(f"usage: {program}") and "VIDEOGEN_AMQP_URL  (default " in helped.stdout
    assert ("VIDEOGEN_PORT  (default 8080)" in helped.stdout) == (program == "videogen-gateway")
    refused = subprocess.run([sys.executable, "-m", module, "--port", "1"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2
    [line] = refused.stderr.strip().splitlines()
    assert line.startswith(f"{program}: takes no arguments (got '--port 1')") and f"{program} --help" in line


@pytest.mark.parametrize(
    ("cls", "variable", "value", "says"),
    [
        (GatewaySettings, "VIDEOGEN_MODEL_OVERRIDES", "{bad json", "must be JSON"),
        (
            GatewaySettings,
            "VIDEOGEN_MODEL_OVERRIDES",
            '{"ltx-tiny": {"max_queue_s": "soon"}}',
            "model 'ltx-tiny': max_queue_s:",
        ),
        (
            GatewaySettings,
            "VIDEOGEN_MODEL_OVERRIDES",
            '{"ltx-tiny": {"limits": {"max_width": "x"}}}',
            "limits.max_width:",
        ),
        (GatewaySettings, "VIDEOGEN_DEFAULT_MODEL", "nope", "default_model 'nope' is not in the registry; known: "),
        (GatewaySettings, "VIDEOGEN_MODELS_FILE", "/no/such/models.toml", "cannot read '/no/such/models.toml'"),
        (GatewaySettings, "VIDEOGEN_LOG_LEVEL", "LOUD", "must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
        (GatewaySettings, "VIDEOGEN_PORT", "70000", "less than or equal to 65535"),
        (GatewaySettings, "VIDEOGEN_MAX_CONCURRENT_UPLOADS", "0", "greater than or equal to 1"),
        (GatewaySettings, "VIDEOGEN_WEBHOOK_SECRET", "whsec_", "must be a non-empty key in base64"),
        (GatewaySettings, "VIDEOGEN_WEBHOOK_SECRET", "not-base64!!", "(got a value, not shown)"),
        (GatewaySettings, "VIDEOGEN_S3_ENDPOINT", "http://127.0.0.1:9000", "without a scheme"),
        (WorkerSettings, "VIDEOGEN_S3_ENDPOINT", "127.0.0.1:abc", "port that is not a number from 1 to 65535"),
        (WorkerSettings, "VIDEOGEN_S3_ENDPOINT", "minio:9000/videogen", "only a host and a port"),
        (GatewaySettings, "VIDEOGEN_S3_PUBLIC_ENDPOINT", "ftp://x:1", "an http:// or https:// URL"),
        (GatewaySettings, "VIDEOGEN_S3_PUBLIC_ENDPOINT", "videos.example.com:8443/prefix", "only a host and a port"),
        (WorkerSettings, "VIDEOGEN_DEVICE", "tpu", "must be auto or a torch device"),
        (WorkerSettings, "VIDEOGEN_HEALTH_PORT", "-1", "greater than or equal to 0"),
    ],
)
def test_a_bad_setting_read_later_also_stops_the_process_with_one_line(
    monkeypatch, capsys, cls, variable, value, says
) -> None:
    """Settings parsed as JSON, checked by the model registry they make, or used only once the
    process runs (the log level, the port, the device) are refused with the others: one line naming
    the variable and what is wrong, exit status 2, before anything starts."""
    from common.settings import settings_or_exit

    for name in [k for k in os.environ if k.startswith("VIDEOGEN_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as stopped:
        settings_or_exit(cls, "videogen-x")
    assert stopped.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"videogen-x: {variable}: ") and says in line, line


def test_good_values_of_those_settings_pass(monkeypatch) -> None:
    from common.settings import settings_or_exit

    monkeypatch.setenv("VIDEOGEN_LOG_LEVEL", "warning")
    monkeypatch.setenv("VIDEOGEN_DEVICE", "cuda:1")
    monkeypatch.setenv("VIDEOGEN_MODEL_OVERRIDES", '{"ltx-tiny": {"max_queue_s": 5}}')
    settings = settings_or_exit(WorkerSettings, "videogen-worker")
    assert (settings.log_level, settings.device) == ("WARNING", "cuda:1")
    assert settings.registry().get("ltx-tiny").max_queue_s == 5


def test_an_empty_key_file_setting_is_no_key_file(monkeypatch) -> None:
    """Empty, the variable names no file (not the current folder): the gateway says to set it."""
    from gateway.app import ConfigError, build_keys

    monkeypatch.setenv("VIDEOGEN_API_KEYS_FILE", "")
    settings = GatewaySettings()
    assert settings.api_keys_file is None
    with pytest.raises(ConfigError, match="set VIDEOGEN_API_KEYS_FILE"):
        build_keys(settings)


def test_a_cuda_device_this_machine_lacks_is_refused(monkeypatch) -> None:
    import torch

    from worker.pipelines import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="sees no CUDA device"):
        pick_device("cuda")
    assert pick_device("auto") == torch.device("cpu") and pick_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="2 CUDA device"):
        pick_device("cuda:2")
    assert pick_device("cuda:1") == torch.device("cuda:1")
