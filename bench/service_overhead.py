"""Benchmark 3: what the service adds to the pipeline, per job, on a CPU with the tiny model.

One job at a time: submit, watch its WebSocket until the terminal event. Wall time is from the
submission to that event; the pipeline's own time is what the worker measured inside the
diffusers call (prompt encoding to decode: `load + denoise + decode` in the job's `timings`).
Overhead = wall - pipeline: validation, store writes, broker hops, queueing, encoding, upload,
events.

    python bench/service_overhead.py --jobs 60 --out bench/results/service-overhead.json
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import aiohttp
from harness import AUTH, bench_stack, machine, percentiles, write_result

BODY = {"prompt": "overhead", "model": "ltx-tiny", "width": 32, "height": 32, "num_frames": 9, "num_inference_steps": 2}


async def one_job(http: aiohttp.ClientSession, gateway: str) -> dict:
    started = time.perf_counter()
    async with http.post(f"{gateway}/api/v1/generate/text-to-video", json=BODY) as response:
        accepted = await response.json()
        assert response.status == 202, accepted
    submitted = time.perf_counter()
    final = None
    async with http.ws_connect(f"{gateway}/api/v1/ws", params={"job_id": accepted["job_id"]}) as ws:
        async for msg in ws:
            frame = msg.json()
            if "job" in frame:
                final = frame["job"]
    wall = time.perf_counter() - started
    assert final is not None and final["status"] == "succeeded", final
    t = final["timings"]
    pipeline = t["load"] + t["denoise"] + t["decode"]
    return {
        "wall": wall,
        "submit": submitted - started,
        "pipeline": pipeline,
        "overhead": wall - pipeline,
        "queued": t["queued"],
        "encode": t["encode"],
        "upload": t["upload"],
    }


async def run(gateway: str, jobs: int) -> list[dict]:
    async with aiohttp.ClientSession(headers=AUTH) as http:
        for _ in range(3):
            await one_job(http, gateway)  # warm-up: first-call costs in every process
        return [await one_job(http, gateway) for _ in range(jobs)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=60)
    parser.add_argument("--out", default="bench/results/service-overhead.json")
    args = parser.parse_args()
    with bench_stack() as stack:
        stack.start_worker("worker-bench", ["ltx-tiny"])
        rows = asyncio.run(run(stack.gateway_url, args.jobs))
    summary = {name: percentiles([r[name] for r in rows]) for name in rows[0]}
    print(
        f"{len(rows)} jobs: overhead median {summary['overhead']['p50_ms']} ms, p95 {summary['overhead']['p95_ms']} "
        f"ms (wall median {summary['wall']['p50_ms']} ms, pipeline median {summary['pipeline']['p50_ms']} ms)"
    )
    for name in ("submit", "queued", "encode", "upload"):
        print(f"  {name:<7} median {summary[name]['p50_ms']} ms")
    write_result(
        args.out,
        {
            "benchmark": "service_overhead",
            **machine(),
            "jobs": len(rows),
            "job": BODY,
            "goal": "overhead < 100 ms median",
            "summary": summary,
            "overhead_share_of_wall": round(statistics.median(r["overhead"] / r["wall"] for r in rows), 3),
        },
    )


if __name__ == "__main__":
    main()
