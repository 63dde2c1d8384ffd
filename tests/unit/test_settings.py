from __future__ import annotations

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
