"""Benchmark 2: event latency, from a worker's publish to a WebSocket client's receipt.

A publisher does what a worker does after each step (a `JobEvent` to the events topic exchange,
through the same topology code); a client holds `GET /api/v1/ws?all=true` open on the gateway.
Each event carries its publish time; the client notes its arrival (same machine, same clock).
Events go out at a steady rate, as a few busy workers would send them.

    python bench/event_latency.py --out bench/results/event-latency.json
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

import aiohttp
from harness import AUTH, bench_stack, machine, percentiles, write_result

from common.topology import Topology, connect, to_amqp
from schemas.jobs import JobStatus, Phase
from schemas.messages import JobEvent


async def measure(gateway: str, amqp_url: str, namespace: str, count: int, rate: float) -> dict:
    sent: dict[tuple[str, int], float] = {}
    latencies: list[float] = []
    done = asyncio.Event()
    jobs = [str(uuid.uuid4()) for _ in range(8)]  # eight jobs' worth of steps, interleaved

    async with aiohttp.ClientSession(headers=AUTH) as http:
        async with http.ws_connect(f"{gateway}/api/v1/ws", params={"all": "true"}) as ws:

            async def receive() -> None:
                async for msg in ws:
                    arrived = time.perf_counter()
                    frame = msg.json()
                    key = (frame["job_id"], frame["seq"])
                    if key in sent:
                        latencies.append(arrived - sent.pop(key))
                        if len(latencies) == count:
                            done.set()
                            return

            reader = asyncio.create_task(receive())
            connection = await connect(amqp_url)
            async with connection:
                channel = await connection.channel(publisher_confirms=False)
                exchange = await Topology(namespace).declare_events(channel)
                interval = 1.0 / rate
                next_at = time.perf_counter()
                for i in range(count):
                    job_id, seq = jobs[i % len(jobs)], i // len(jobs)
                    event = JobEvent(
                        job_id=job_id,
                        seq=seq,
                        status=JobStatus.RUNNING,
                        phase=Phase.DENOISING,
                        progress=0.5,
                        step=seq,
                        total_steps=count,
                        owner="bench",
                    )
                    sent[(job_id, seq)] = time.perf_counter()
                    await exchange.publish(to_amqp(event), routing_key=Topology.event_key(job_id, event.status))
                    next_at += interval
                    await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
                await asyncio.wait_for(done.wait(), 30)
            reader.cancel()
    return {"events": count, "rate_per_s": rate, "lost": count - len(latencies), **percentiles(latencies)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--rates", default="50,500", help="events per second, one run each")
    parser.add_argument("--out", default="bench/results/event-latency.json")
    args = parser.parse_args()
    rows = []
    with bench_stack() as stack:
        amqp_url, namespace = stack.env["VIDEOGEN_AMQP_URL"], stack.env["VIDEOGEN_BROKER_NAMESPACE"]
        asyncio.run(measure(stack.gateway_url, amqp_url, namespace, 100, 100))  # warm-up
        for rate in (float(r) for r in args.rates.split(",")):
            row = asyncio.run(measure(stack.gateway_url, amqp_url, namespace, args.events, rate))
            print(
                f"{rate:>6.0f} events/s: p50 {row['p50_ms']} ms  p99 {row['p99_ms']} ms  max {row['max_ms']} ms  "
                f"lost {row['lost']}",
                flush=True,
            )
            rows.append(row)
    write_result(
        args.out,
        {
            "benchmark": "event_latency",
            **machine(),
            "goal": "p99 < 20 ms from the worker's publish to the WebSocket client",
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
