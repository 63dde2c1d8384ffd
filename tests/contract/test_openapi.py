"""The OpenAPI document against the running gateway: schemathesis generates requests (valid and
invalid) for every operation and checks that no answer is a 5xx and every answer matches the document."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import requests

from scripts import devstack
from tests.conftest import delete_test_namespace
from tests.helpers import TOKENS

CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
]
# Streams never end by themselves (a stream of all jobs is endless): they are tested in tests/integration.
STREAMS = r"^/api/v1/(ws|events)$"


@pytest.fixture(scope="module")
def contract_gateway(stack, amqp_url):
    """A gateway in a namespace of its own with no workers: generated jobs wait in its queues, never run."""
    ns = f"contract-{uuid.uuid4().hex[:8]}"
    url, proc = stack.start_gateway("gateway-contract", VIDEOGEN_BROKER_NAMESPACE=ns)
    yield url
    # Stopped first: a running gateway would declare its consumers' queues again once deleted.
    devstack.stop_pid(proc.pid)
    asyncio.run(delete_test_namespace(amqp_url, ns))


def test_every_answer_matches_the_document(contract_gateway, tmp_path: Path) -> None:
    command = [
        str(Path(sys.executable).parent / "schemathesis"),
        "run",
        f"{contract_gateway}/openapi.json",
        "--url",
        contract_gateway,
        "--header",
        f"Authorization: Bearer {TOKENS['tester']}",
        "--checks",
        ",".join(CHECKS),
        "--exclude-path-regex",
        STREAMS,
        "--mode",
        "all",
        "--max-examples",
        "25",
        "--seed",
        "1",
        "--workers",
        "1",
        "--report",
        "junit",
        "--report-dir",
        str(tmp_path),
    ]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=420,
        env=dict(os.environ, SCHEMATHESIS_HOOKS="", NO_COLOR="1"),
        cwd=tmp_path,  # schemathesis keeps a cache of its findings in .schemathesis/ there
    )
    summary = [line for line in result.stdout.splitlines() if line.strip()][-12:]
    print("\n".join(summary))
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


def test_the_document_is_openapi_3_1(contract_gateway) -> None:
    from openapi_spec_validator import validate

    document = requests.get(f"{contract_gateway}/openapi.json", timeout=10).json()
    assert document["openapi"] == "3.1.0"
    validate(document)
    assert {"/api/v1/generate/text-to-video", "/api/v1/jobs/{job_id}", "/api/v1/ws"} <= set(document["paths"])
