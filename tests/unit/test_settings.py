from __future__ import annotations

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
