"""Operations: Prometheus metrics on the gateway and the worker, the per-job summary log line,
and the retention rule the gateway sets on the bucket."""

from __future__ import annotations

import json
import re

import aiohttp
import pytest

from tests.helpers import client, s3_client, submit, until, watch


@pytest.fixture
async def http():
    async with client() as session:
        yield session


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one Prometheus sample, or None when it is absent."""
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            series = line.rsplit(" ", 1)[0]
            found = dict(re.findall(r'(\w+)="([^"]*)"', series[series.find("{") :])) if "{" in series else {}
            if all(found.get(k) == v for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return None


async def scrape(url: str) -> str:
    async with aiohttp.ClientSession() as plain, plain.get(url) as response:  # no API key: scrapers have none
        assert response.status == 200 and response.content_type == "text/plain", response.content_type
        return await response.text()


async def test_gateway_and_worker_metrics(stack, http) -> None:
    accepted = await submit(http, stack.gateway_url, {"prompt": "metrics", "model": "ltx-tiny"})
    await watch(http, stack.gateway_url, accepted["job_id"])
    async with http.get(f"{stack.gateway_url}/api/v1/jobs/{accepted['job_id']}") as response:
        assert response.status == 200
    async with http.put(f"{stack.gateway_url}/api/v1/jobs/{accepted['job_id']}") as response:
        assert response.status == 405

    text = await scrape(f"{stack.gateway_url}/metrics")
    assert sample(text, "videogen_jobs_submitted_total", model="ltx-tiny", mode="text-to-video", priority="normal") >= 1
    route = "/api/v1/jobs/{job_id}"
    assert sample(text, "videogen_http_requests_total", method="GET", route=route, status="200") >= 1
    # A method the path does not take counts under the path's route, not as unmatched.
    assert sample(text, "videogen_http_requests_total", method="PUT", route=route, status="405") >= 1
    assert sample(text, "videogen_http_request_seconds_count", method="GET", route=route) >= 1
    assert sample(text, "videogen_workers", model="ltx-tiny") >= 1
    for priority in ("high", "normal", "low"):
        assert sample(text, "videogen_queue_depth", model="ltx-tiny", priority=priority) is not None
    assert sample(text, "videogen_broker_connected") == 1

    async def worker_counted() -> bool:
        worker = await scrape(f"{stack.worker_health_url}/metrics")
        return (sample(worker, "videogen_worker_jobs_total", model="ltx-tiny", status="succeeded") or 0) >= 1

    await until(worker_counted, 10, "the worker's job counter")
    worker = await scrape(f"{stack.worker_health_url}/metrics")
    for phase in ("queued", "load", "denoise", "decode", "encode", "upload"):
        assert sample(worker, "videogen_worker_phase_seconds_count", model="ltx-tiny", phase=phase) >= 1

    async def idle() -> bool:  # the gauges come back down once the worker's jobs have ended
        worker = await scrape(f"{stack.worker_health_url}/metrics")
        busy = sample(worker, "videogen_worker_busy")
        return busy == 0 and sample(worker, "videogen_worker_running", model="ltx-tiny") == 0

    await until(idle, 30, "the worker's busy and running gauges back at 0")


async def test_one_summary_line_per_job_with_its_id(stack, http) -> None:
    accepted = await submit(http, stack.gateway_url, {"prompt": "summary", "model": "ltx-tiny"})
    await watch(http, stack.gateway_url, accepted["job_id"])
    log = stack.logs / "worker-ltx.log"

    def summaries() -> list[dict]:
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        return [e for e in lines if e["event"] == "job_summary" and e.get("job_id") == accepted["job_id"]]

    async def written() -> bool:
        return bool(summaries())

    await until(written, 10, "the job's summary line")
    (line,) = summaries()
    assert line["status"] == "succeeded" and line["model"] == "ltx-tiny" and line["attempts"] == 1
    assert {"queued_s", "load_s", "denoise_s", "decode_s", "encode_s", "upload_s"} <= set(line)
    # Every line the worker wrote while it held the job names it.
    lines = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
    during = [e for e in lines if e.get("job_id") == accepted["job_id"]]
    assert during and all(e["model"] == "ltx-tiny" for e in during)


async def test_retention_rules_are_set_removed_when_unset_and_never_rewrite_an_owners_rules(stack, s3_store) -> None:
    """A gateway with VIDEOGEN_OUTPUT_RETENTION_DAYS puts its two rules on the bucket, and one
    started without it removes them. On a bucket with a rule of its owner's, the configuration
    is left as it is (S3 writes it as a whole, and rewriting could change the owner's rules):
    the gateway says so and starts."""
    from minio.commonconfig import ENABLED, Filter
    from minio.lifecycleconfig import Expiration, LifecycleConfig, Rule

    from scripts.devstack import stop_pids

    s3 = s3_client(s3_store)

    def rules() -> set[tuple]:
        config = s3.get_bucket_lifecycle(s3_store.bucket)
        return {(r.rule_id, r.rule_filter.prefix, r.expiration.days) for r in (config.rules if config else [])}

    def logged(name: str) -> list[dict]:
        lines = (stack.logs / f"{name}.log").read_text().splitlines()
        entries = [json.loads(line) for line in lines if line.startswith("{")]
        return [entry for entry in entries if str(entry.get("event", "")).startswith("retention_")]

    started = []

    def gateway(name: str, **env: str) -> list[dict]:
        started.append(stack.start_gateway(name, **env)[1])
        return logged(name)

    try:
        set_log = gateway("gateway-retention", VIDEOGEN_OUTPUT_RETENTION_DAYS="7")
        assert rules() == {("videogen-expire-jobs", "jobs/", 7), ("videogen-expire-index", "index/", 7)}
        assert [e["event"] for e in set_log] == ["retention_set"]
        assert [e["event"] for e in gateway("gateway-without-retention")] == ["retention_removed"]
        assert rules() == set()

        mine = ("mine", "scratch/", 1)
        owners = Rule(ENABLED, rule_filter=Filter(prefix="scratch/"), rule_id="mine", expiration=Expiration(days=1))
        s3.set_bucket_lifecycle(s3_store.bucket, LifecycleConfig([owners]))
        [refused] = gateway("gateway-retention-beside-an-owners-rule", VIDEOGEN_OUTPUT_RETENTION_DAYS="7")
        assert refused["event"] == "retention_not_applied" and refused["level"] == "warning"
        assert "'mine'" in refused["error"]
        assert rules() == {mine}
        assert gateway("gateway-without-retention-beside-an-owners-rule") == []  # nothing of ours to remove
        assert rules() == {mine}
    finally:
        stop_pids([g.pid for g in started])
        s3.delete_bucket_lifecycle(s3_store.bucket)


def test_a_gateway_whose_port_is_taken_says_so_in_one_line(stack) -> None:
    """It logs `gateway_started` only once it listens: here it never does, and it ends with one
    line naming the address, exit status 1, no traceback."""
    import subprocess
    import sys
    from urllib.parse import urlsplit

    port = urlsplit(stack.gateway_url).port  # the stack's gateway listens there
    env = dict(stack.env, VIDEOGEN_PORT=str(port))
    done = subprocess.run([sys.executable, "-m", "gateway.main"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith(f"videogen-gateway: cannot listen on 127.0.0.1:{port}: "), lines[-1]
    assert "address already in use" in lines[-1]
    assert "Traceback" not in done.stderr and "gateway_started" not in done.stderr


@pytest.mark.parametrize("cause", ["health port taken", "model missing"])
def test_a_worker_that_cannot_start_logs_worker_exit_and_exits_2(stack, tmp_path, cause) -> None:
    """One `worker_exit` line saying why, and status 2, not a traceback and status 1 (as for the
    other failures at start: the store or the broker not answering in time)."""
    import socket
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = dict(
            stack.env,
            VIDEOGEN_SERVE_MODELS="ltx-tiny",
            VIDEOGEN_HEALTH_HOST="127.0.0.1",
            VIDEOGEN_HEALTH_PORT=str(port),
            VIDEOGEN_WORKER_ID="worker-that-cannot-start",
        )
        if cause == "model missing":
            env["VIDEOGEN_MODELS_DIR"] = str(tmp_path)  # empty
        done = subprocess.run(
            [sys.executable, "-m", "worker.main"], env=env, capture_output=True, text=True, timeout=120
        )
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    exits = [json.loads(line) for line in output.splitlines() if '"worker_exit"' in line]
    reason = (
        f"cannot listen on 127.0.0.1:{port}" if cause == "health port taken" else "model 'ltx-tiny' could not be loaded"
    )
    assert len(exits) == 1 and exits[0]["reason"].startswith(reason), output
    if cause == "health port taken":
        assert "Traceback" not in output
    else:  # the model's own error, with its traceback, in a line of its own
        failed = [json.loads(line) for line in output.splitlines() if '"model_load_failed"' in line]
        assert [f["model"] for f in failed] == ["ltx-tiny"], output
