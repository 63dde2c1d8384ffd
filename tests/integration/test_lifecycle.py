"""Job lifecycle: phases and ETA, replay after disconnects and gateway restarts, several gateways,
several jobs per stream, Server-Sent Events, cancel, listing."""

from __future__ import annotations

import asyncio
import json
from urllib.parse import quote

import aiohttp
import pytest

from scripts.devstack import stop_pid
from tests.helpers import client, get_json, object_names, sse_events, submit, until, until_step, watch

SLOW = {"prompt": "slow", "model": "ltx-slow", "width": 256, "height": 256, "num_frames": 65}


@pytest.fixture
async def http():
    async with client() as session:
        yield session


def without_job(frames: list[dict]) -> list[dict]:
    return [{k: v for k, v in f.items() if k != "job"} for f in frames]


async def read_frames(ws: aiohttp.ClientWebSocketResponse, until, timeout: float = 60) -> list[dict]:
    """Frames from an open WebSocket until `until(frames)` holds or the server closes it."""
    frames: list[dict] = []

    async def run() -> None:
        async for msg in ws:
            frames.append(msg.json())
            if until(frames):
                return

    await asyncio.wait_for(run(), timeout)
    return frames


async def test_events_are_steps_plus_phases_with_an_eta(stack, http) -> None:
    accepted = await submit(http, stack.gateway_url, SLOW | {"num_inference_steps": 8})
    assert accepted["queue_position"] == 0
    frames = await watch(http, stack.gateway_url, accepted["job_id"])
    assert [f["phase"] for f in frames] == [
        "queued",
        "loading",
        *["denoising"] * 8,
        "decoding",
        "encoding",
        "uploading",
        "succeeded",
    ]
    assert frames[0]["queue_position"] == 0
    denoise = [f for f in frames if f["phase"] == "denoising"]
    assert [f["eta_s"] is None for f in denoise] == [True, True] + [False] * 6
    assert all(f["eta_s"] >= 0 for f in denoise[2:]) and denoise[-1]["eta_s"] <= denoise[2]["eta_s"]
    progress = [f["progress"] for f in frames]
    assert progress == sorted(progress)


async def test_reconnect_with_since_has_no_gap_and_no_duplicate(stack, http) -> None:
    accepted = await submit(http, stack.gateway_url, SLOW | {"num_inference_steps": 20})
    job_id = accepted["job_id"]
    async with http.ws_connect(f"{stack.gateway_url}/api/v1/ws", params={"job_id": job_id}) as ws:
        first = await read_frames(ws, lambda f: len(f) >= 4)
    # Forced disconnect above; resume after the last seq seen.
    rest = await watch(http, stack.gateway_url, job_id, since=str(first[-1]["seq"]))
    seqs = [f["seq"] for f in first + rest]
    assert seqs == list(range(len(seqs))) and (first + rest)[-1]["status"] == "succeeded"
    assert rest[0]["seq"] == first[-1]["seq"] + 1


async def test_reconnect_after_the_gateway_restarted(stack, http) -> None:
    gateway, proc = stack.start_gateway("gateway-restarting")
    accepted = await submit(http, gateway, SLOW | {"num_inference_steps": 40})
    job_id = accepted["job_id"]
    async with http.ws_connect(f"{gateway}/api/v1/ws", params={"job_id": job_id}) as ws:
        first = await read_frames(ws, lambda f: any(x["phase"] == "denoising" for x in f))
        stopping = asyncio.ensure_future(asyncio.to_thread(stop_pid, proc.pid))
        async for msg in ws:  # the frames sent until the gateway closes the stream
            first.append(msg.json())
        await stopping
    # 1001, going away: not 1000, which says every job of the stream has ended.
    assert ws.close_code == 1001, ws.close_code
    replacement, _ = stack.start_gateway("gateway-replacement")
    rest = await watch(http, replacement, job_id, since=str(first[-1]["seq"]))
    frames = first + rest
    assert [f["seq"] for f in frames] == list(range(len(frames)))
    assert frames[-1]["status"] == "succeeded"
    assert sum(f["phase"] == "denoising" for f in frames) == 40


async def test_two_gateways_relay_the_same_events(stack, http) -> None:
    other, _ = stack.start_gateway("gateway-second")
    accepted = await submit(http, stack.gateway_url, SLOW | {"num_inference_steps": 10})
    # Both connect while the job runs on a worker; each relays it from its own events queue.
    here, there = await asyncio.gather(
        watch(http, stack.gateway_url, accepted["job_id"]), watch(http, other, accepted["job_id"])
    )
    assert without_job(here) == without_job(there)
    assert [f["seq"] for f in here] == list(range(len(here)))


async def test_one_stream_for_several_jobs_and_for_all(stack, http) -> None:
    async with http.ws_connect(f"{stack.gateway_url}/api/v1/ws", params={"all": "true"}) as everything:
        a = await submit(http, stack.gateway_url, {"prompt": "a"})
        b = await submit(http, stack.gateway_url, {"prompt": "b", "model": "wan-tiny"})
        both = await watch(http, stack.gateway_url, [a["job_id"], b["job_id"]])
        ids = {a["job_id"], b["job_id"]}
        seen = await read_frames(everything, lambda f: {x["job_id"] for x in f if x["status"] == "succeeded"} >= ids)
    for job_id in ids:
        mine = [f for f in both if f["job_id"] == job_id]
        assert [f["seq"] for f in mine] == list(range(len(mine))) and mine[-1]["status"] == "succeeded"
        live = [f for f in seen if f["job_id"] == job_id]
        assert [f["seq"] for f in live] == sorted({f["seq"] for f in live})  # in order, no duplicate


async def test_server_sent_events_and_last_event_id(stack, http) -> None:
    accepted = await submit(http, stack.gateway_url, {"prompt": "sse"})
    job_id = accepted["job_id"]
    url = f"{stack.gateway_url}/api/v1/events"
    async with http.get(url, params={"job_id": job_id}) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = [(i, e, json.loads(d)) async for i, e, d in sse_events(response)]
    assert [e for _, e, _ in events] == ["job.event"] * len(events)
    assert [i for i, _, _ in events] == [f"{job_id}:{d['seq']}" for _, _, d in events]
    assert events[-1][2]["status"] == "succeeded" and events[-1][2]["job"]["result"]["url"]
    resume_from = events[3][0]
    async with http.get(url, params={"job_id": job_id}, headers={"Last-Event-ID": resume_from}) as response:
        later = [json.loads(d) async for _, _, d in sse_events(response)]
    assert [d["seq"] for d in later] == [d["seq"] for _, _, d in events[4:]]
    # Resumed after the terminal event: nothing more will come, and 204 tells an EventSource so.
    async with http.get(url, params={"job_id": job_id}, headers={"Last-Event-ID": events[-1][0]}) as response:
        assert response.status == 204 and await response.read() == b""


async def test_server_sent_events_over_several_jobs_resume_by_last_event_id(stack, http) -> None:
    """On a stream of several jobs each event's id holds every job's position, so the id of the
    last event received (what an EventSource sends back) resumes all of them: no gap, no repeat."""
    jobs = [(await submit(http, stack.gateway_url, {"prompt": f"sse {n}"}))["job_id"] for n in range(2)]
    url = f"{stack.gateway_url}/api/v1/events"
    params = [("job_id", job_id) for job_id in jobs]
    async with http.get(url, params=params) as response:
        events = [(i, json.loads(d)) async for i, _, d in sse_events(response)]
    last: dict[str, int] = {}
    for event_id, data in events:  # each id: the last seq sent of each job, in the order listed
        last[data["job_id"]] = data["seq"]
        assert event_id == "seqs:" + ",".join(str(last.get(job_id, -1)) for job_id in jobs)
    for cut in (1, len(events) // 2, len(events) - 3):
        async with http.get(url, params=params, headers={"Last-Event-ID": events[cut - 1][0]}) as response:
            later = [json.loads(d) async for _, _, d in sse_events(response)]
        expected = [(d["job_id"], d["seq"]) for _, d in events[cut:]]
        assert sorted((d["job_id"], d["seq"]) for d in later) == sorted(expected)
        for job_id in jobs:  # in seq order per job
            seqs = [d["seq"] for d in later if d["job_id"] == job_id]
            assert seqs == sorted(seqs)
    async with http.get(url, params=params, headers={"Last-Event-ID": events[-1][0]}) as response:
        assert response.status == 204  # both ended, and the client has both ends
    for header in ("seqs:1", f"{jobs[0]}:3"):  # a count that is not the stream's; one job's id
        async with http.get(url, params=params, headers={"Last-Event-ID": header}) as response:
            error = (await response.json())["error"]
        assert response.status == 400 and error["code"] == "bad_parameter" and "Last-Event-ID" in error["message"]


async def test_cancel_a_running_job_stops_within_a_step_and_leaves_no_video(stack, http) -> None:
    accepted = await submit(http, stack.gateway_url, SLOW | {"num_inference_steps": 60})
    job_id = accepted["job_id"]
    async with http.ws_connect(f"{stack.gateway_url}/api/v1/ws", params={"job_id": job_id}) as ws:
        before = await read_frames(ws, lambda f: any(x.get("step") == 2 for x in f))
        async with http.post(f"{stack.gateway_url}/api/v1/jobs/{job_id}/cancel") as response:
            assert response.status == 202 and (await response.json())["status"] == "running"
        after = await read_frames(ws, lambda f: f[-1]["status"] in ("succeeded", "failed", "cancelled"))
    frames = before + after
    assert frames[-1]["status"] == "cancelled" and frames[-1]["job"]["result"] is None
    assert [f["seq"] for f in frames] == list(range(len(frames)))
    last_step = max(f["step"] or 0 for f in frames)
    assert last_step <= 2 + 2, f"ran {last_step} of 60 steps after cancel at step 2"
    assert not {"decoding", "encoding", "uploading"} & {f["phase"] for f in frames}
    status, job = await get_json(http, f"{stack.gateway_url}/api/v1/jobs/{job_id}")
    assert job["status"] == "cancelled" and job["message"] == "cancelled while running"
    assert not await _video_exists(stack, job_id)
    async with http.delete(f"{stack.gateway_url}/api/v1/jobs/{job_id}") as response:
        assert response.status == 409 and (await response.json())["error"]["code"] == "job_finished"


async def test_cancel_a_queued_job_means_it_never_runs(stack, http) -> None:
    running = await submit(http, stack.gateway_url, SLOW | {"num_inference_steps": 30})
    queued = await submit(http, stack.gateway_url, SLOW | {"num_inference_steps": 2})
    assert queued["queue_position"] is not None
    async with http.delete(f"{stack.gateway_url}/api/v1/jobs/{queued['job_id']}") as response:
        body = await response.json()
        assert response.status == 200 and body["status"] == "cancelled"
        assert body["message"] == "cancelled before it started"
    await watch(http, stack.gateway_url, running["job_id"])

    # The single slow worker takes the cancelled job next, and drops it: wait until its queue is empty.
    async def queue_empty() -> bool:
        status, info = await get_json(http, f"{stack.gateway_url}/api/v1/model/info?model=ltx-slow")
        return info["queue_depth"] == 0

    await until(queue_empty, what="the slow worker dropped the cancelled job")
    status, job = await get_json(http, f"{stack.gateway_url}/api/v1/jobs/{queued['job_id']}")
    assert job["status"] == "cancelled" and job["started_at"] is None
    frames = await watch(http, stack.gateway_url, queued["job_id"])
    assert [f["status"] for f in frames] == ["queued", "cancelled"]
    assert not await _video_exists(stack, queued["job_id"])


async def by_start_time(http, gateway: str, accepted: list[dict]) -> list[dict]:
    """The accepted jobs (`202` bodies) in the order they started; each must have succeeded."""
    started = {}
    for a in accepted:
        status, job = await get_json(http, f"{gateway}/api/v1/jobs/{a['job_id']}")
        assert job["status"] == "succeeded", job
        started[a["job_id"]] = job["started_at"]
    return sorted(accepted, key=lambda a: started[a["job_id"]])


async def test_higher_priority_jobs_run_first(stack, http) -> None:
    """While the one slow worker is busy, jobs queue as low, normal, high, low: they run high,
    normal, low, low (the stack's slow worker always takes the highest priority first,
    `VIDEOGEN_LOWER_PRIORITY_EVERY=0`)."""
    blocker = await submit(http, stack.gateway_url, SLOW | {"num_inference_steps": 30})
    await until_step(http, stack.gateway_url, blocker["job_id"], 1)
    short = SLOW | {"num_inference_steps": 1, "width": 64, "height": 64, "num_frames": 9}
    order = ["low", "normal", "high", "low"]
    accepted = [await submit(http, stack.gateway_url, short | {"priority": p}) for p in order]
    assert [a["request"]["priority"] for a in accepted] == order
    # Ahead of each: the waiting jobs of its priority or higher.
    assert [a["queue_position"] for a in accepted] == [0, 0, 0, 3]
    status, info = await get_json(http, f"{stack.gateway_url}/api/v1/model/info?model=ltx-slow")
    assert info["queue_depth_by_priority"] == {"high": 1, "normal": 1, "low": 2} and info["queue_depth"] == 4
    assert info["workers"] == 1
    await watch(http, stack.gateway_url, [blocker["job_id"]] + [a["job_id"] for a in accepted], timeout=120)
    by_start = await by_start_time(http, stack.gateway_url, accepted)
    assert [a["request"]["priority"] for a in by_start] == ["high", "normal", "low", "low"]
    # Within a priority, first in first out.
    assert by_start[2]["job_id"] == accepted[0]["job_id"]


async def test_lower_priorities_get_turns_while_higher_ones_wait(stack, http, amqp_url, namespace) -> None:
    """Jobs queued for a model no worker serves yet, low and normal first, then four high ones; a
    worker that gives the lower priorities every 2nd job (`VIDEOGEN_LOWER_PRIORITY_EVERY=2`; its
    4th starts at low) then runs them high, normal, high, low, high, high: neither waits for
    every high job."""
    from scripts.devstack import stop_pids
    from tests.conftest import delete_test_namespace

    ns = f"{namespace}-turns"
    gateway, gw = stack.start_gateway("gateway-turns", VIDEOGEN_BROKER_NAMESPACE=ns)
    worker = None
    try:
        order = ["low", "normal", "high", "high", "high", "high"]
        accepted = [await submit(http, gateway, {"prompt": "turns", "priority": p}) for p in order]
        assert {a["workers"] for a in accepted} == {0}
        _, worker = stack.start_worker(
            f"worker-turns-{ns}", ["ltx-tiny"], VIDEOGEN_BROKER_NAMESPACE=ns, VIDEOGEN_LOWER_PRIORITY_EVERY="2"
        )
        await watch(http, gateway, [a["job_id"] for a in accepted], timeout=120)
        by_start = await by_start_time(http, gateway, accepted)
        assert [a["request"]["priority"] for a in by_start] == ["high", "normal", "high", "low", "high", "high"]
        assert [a["job_id"] for a in by_start if a["request"]["priority"] == "high"] == [
            a["job_id"] for a in accepted[2:]
        ]
    finally:
        stop_pids([gw.pid] + ([worker.pid] if worker else []))
        await delete_test_namespace(amqp_url, ns)


async def test_a_bad_priority_is_refused(stack, http) -> None:
    async with http.post(
        f"{stack.gateway_url}/api/v1/generate/text-to-video", json={"prompt": "x", "priority": "urgent"}
    ) as response:
        body = await response.json()
    assert response.status == 422 and body["error"]["details"][0]["field"] == "priority", body


async def test_list_jobs_newest_first_with_pages_and_filters(stack, http) -> None:
    made = []
    for n in range(3):
        accepted = await submit(
            http,
            stack.gateway_url,
            {"prompt": f"list {n}", "model": "wan-i2v-tiny", "image": _tiny_png_b64()},
            mode="image-to-video",
        )
        made.append(accepted["job_id"])
        # Another model's job between them: the model's listing passes over it.
        other = await submit(http, stack.gateway_url, {"prompt": f"other {n}", "model": "ltx-tiny", "num_frames": 9})
    await asyncio.gather(*(watch(http, stack.gateway_url, j) for j in made + [other["job_id"]]))
    base = f"{stack.gateway_url}/api/v1/jobs?model=wan-i2v-tiny"
    status, page1 = await get_json(http, f"{base}&limit=2")
    assert status == 200 and [j["job_id"] for j in page1["jobs"]] == made[::-1][:2]
    status, everything = await get_json(http, f"{stack.gateway_url}/api/v1/jobs?limit=2")
    assert [j["job_id"] for j in everything["jobs"]] == [other["job_id"], made[-1]]
    status, page2 = await get_json(http, f"{base}&limit=2&cursor={page1['next_cursor']}")
    assert [j["job_id"] for j in page2["jobs"]][:1] == made[:1]
    status, succeeded = await get_json(http, f"{base}&status=succeeded&limit=100")
    assert set(made) <= {j["job_id"] for j in succeeded["jobs"]}
    status, cancelled = await get_json(http, f"{stack.gateway_url}/api/v1/jobs?status=cancelled&limit=100")
    assert all(j["status"] == "cancelled" for j in cancelled["jobs"])
    for query, field in (
        ("status=done", "status"),
        ("model=sora", "model"),
        ("limit=0", "limit"),
        ("cursor=../../etc", "cursor"),
    ):
        status, body = await get_json(http, f"{stack.gateway_url}/api/v1/jobs?{query}")
        assert status == 422 and body["error"]["details"][0]["field"] == field
    # No listing makes these (another script's digit, a line end after the cursor): they sort
    # after every entry, and would read as the end of the listing.
    real = page1["next_cursor"]
    millis = real.split("jobs/")[1][:13]
    for forged in (real.replace(millis, "\u0668" + millis[1:]), real + "\n"):
        status, body = await get_json(http, f"{base}&cursor={quote(forged)}")
        assert status == 422 and body["error"]["details"][0]["rule"] == "opaque", forged


def _tiny_png_b64() -> str:
    import base64

    from tests.helpers import png_bytes

    return base64.b64encode(png_bytes(32, 32)).decode()


async def _video_exists(stack, job_id: str) -> bool:
    return f"jobs/{job_id}/video.mp4" in object_names(stack, f"jobs/{job_id}/")


async def test_resuming_after_the_end_closes_at_once(stack, http) -> None:
    accepted = await submit(http, stack.gateway_url, {"prompt": "done"})
    frames = await watch(http, stack.gateway_url, accepted["job_id"])
    assert await watch(http, stack.gateway_url, accepted["job_id"], since=str(frames[-1]["seq"]), timeout=10) == []
    url = f"{stack.gateway_url}/api/v1/events"
    other = "0b6f2ad6-4f7e-4c55-9b1f-3f0a2c1d9e11"
    async with http.get(url, params={"job_id": accepted["job_id"]}, headers={"Last-Event-ID": f"{other}:3"}) as r:
        assert r.status == 400 and (await r.json())["error"]["code"] == "bad_parameter"
    async with http.get(f"{stack.gateway_url}/api/v1/ws", params={"all": "true", "since": "3"}) as r:
        assert r.status == 400


async def test_cancel_works_with_no_worker_connected_at_all(stack, http, amqp_url, namespace) -> None:
    from tests.conftest import delete_test_namespace

    lonely = f"{namespace}-noworkers"
    gateway, proc = stack.start_gateway("gateway-no-workers", VIDEOGEN_BROKER_NAMESPACE=lonely)
    try:
        accepted = await submit(http, gateway, {"prompt": "alone"})
        assert accepted["workers"] == 0
        async with http.post(f"{gateway}/api/v1/jobs/{accepted['job_id']}/cancel") as response:
            body = await response.json()
        assert response.status == 200 and body["status"] == "cancelled", body
    finally:
        stop_pid(proc.pid)
        await delete_test_namespace(amqp_url, lonely)
