"""Benchmark 1: submissions per second and latency of one gateway process, against the real broker.

Clients POST text-to-video jobs as fast as they can, 1, 16 and 64 at a time, for a fixed time
each. Every 202 means the job's record and index are in the object store and the broker has
confirmed the message (publisher confirms). No worker runs, so jobs only queue.

    python bench/gateway_throughput.py --out bench/results/gateway-throughput.json
"""

from __future__ import annotations

import argparse
import asyncio
import time

import aiohttp
from harness import AUTH, bench_stack, machine, percentiles, write_result


async def load(gateway: str, clients: int, seconds: float) -> dict:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    deadline = time.perf_counter() + seconds
    body = {"prompt": "throughput", "model": "ltx-tiny"}
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(headers=AUTH, connector=connector) as http:

        async def client() -> None:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                async with http.post(f"{gateway}/api/v1/generate/text-to-video", json=body) as response:
                    await response.read()
                    statuses[response.status] = statuses.get(response.status, 0) + 1
                if response.status == 202:
                    latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        elapsed = time.perf_counter() - started
    return {
        "clients": clients,
        "seconds": round(elapsed, 2),
        "accepted": len(latencies),
        "statuses": statuses,
        "per_s": round(len(latencies) / elapsed, 1),
        **percentiles(latencies),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="per concurrency level")
    parser.add_argument("--clients", default="1,16,64")
    parser.add_argument("--out", default="bench/results/gateway-throughput.json")
    args = parser.parse_args()
    rows = []
    with bench_stack() as stack:
        asyncio.run(load(stack.gateway_url, 4, 2.0))  # warm-up: connections, first store writes
        for clients in (int(c) for c in args.clients.split(",")):
            row = asyncio.run(load(stack.gateway_url, clients, args.seconds))
            print(
                f"{clients:>3} clients: {row['per_s']:>7.1f} submissions/s  p50 {row['p50_ms']} ms  "
                f"p99 {row['p99_ms']} ms  statuses {row['statuses']}",
                flush=True,
            )
            rows.append(row)
    write_result(
        args.out,
        {
            "benchmark": "gateway_throughput",
            **machine(),
            "goal": ">= 2000 submissions/s and p99 < 50 ms on one gateway process",
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
