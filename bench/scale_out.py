"""Benchmark 4: jobs per second with 1, 2 and 4 worker processes on the tiny model.

For each worker count, a fresh set of workers (one torch thread each) serves one model queue; a
burst of jobs is submitted at once, and the run ends when the last terminal event arrives on a
WebSocket that streams all jobs. The ratio to one worker shows how well workers share a queue;
on a machine with fewer cores than workers the CPU, not the queue, is the limit.

    python bench/scale_out.py --out bench/results/scale-out.json
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import aiohttp
from harness import AUTH, bench_stack, machine, write_result

BODY = {"prompt": "scale", "model": "ltx-tiny", "width": 128, "height": 128, "num_frames": 33, "num_inference_steps": 8}


async def burst(gateway: str, jobs: int) -> dict:
    async with aiohttp.ClientSession(headers=AUTH) as http:
        async with http.ws_connect(f"{gateway}/api/v1/ws", params={"all": "true"}) as ws:
            started = time.perf_counter()
            ids = set()
            for _ in range(jobs):
                async with http.post(f"{gateway}/api/v1/generate/text-to-video", json=BODY) as response:
                    ids.add((await response.json())["job_id"])
            ended: dict[str, str] = {}
            workers: dict[str, int] = {}
            async for msg in ws:
                frame = msg.json()
                if frame["job_id"] in ids and "job" in frame:
                    ended[frame["job_id"]] = frame["status"]
                    worker = frame["job"]["worker"]
                    workers[worker] = workers.get(worker, 0) + 1
                    if len(ended) == len(ids):
                        break
            elapsed = time.perf_counter() - started
    return {
        "jobs": jobs,
        "seconds": round(elapsed, 2),
        "jobs_per_s": round(jobs / elapsed, 2),
        "succeeded": sum(s == "succeeded" for s in ended.values()),
        "jobs_per_worker": sorted(workers.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--out", default="bench/results/scale-out.json")
    args = parser.parse_args()
    rows = []
    with bench_stack() as stack:
        for count in (int(w) for w in args.workers.split(",")):
            for i in range(count):
                stack.start_worker(f"worker-{count}-{i}", ["ltx-tiny"], OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
            asyncio.run(burst(stack.gateway_url, count * 2))  # warm-up: every worker's first job
            row = {"workers": count, **asyncio.run(burst(stack.gateway_url, args.jobs))}
            stack.stop_workers()
            print(
                f"{count} workers: {row['jobs_per_s']} jobs/s ({row['jobs']} jobs in {row['seconds']} s; "
                f"per worker {row['jobs_per_worker']})",
                flush=True,
            )
            rows.append(row)
    base = rows[0]["jobs_per_s"]
    for row in rows:
        row["speedup"] = round(row["jobs_per_s"] / base, 2)
    print("speed-up:", {r["workers"]: r["speedup"] for r in rows})
    write_result(
        args.out, {"benchmark": "scale_out", **machine(), "job": BODY, "cpu_cores": os.cpu_count(), "rows": rows}
    )


if __name__ == "__main__":
    main()
