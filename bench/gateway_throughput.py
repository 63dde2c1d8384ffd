"""Benchmark 1: submissions per second and latency of one gateway process, against the real broker.

Clients POST text-to-video jobs as fast as they can, 1, 16 and 64 at a time, for a fixed time
each, with an API key that has a job quota (too large to matter, 10 million) and then with one
that has none (`max_concurrent_jobs = "unlimited"`, as for a service that queues without limit),
each on a stack of its own. Every 202 means the job's record, index entry and (with a quota) quota
marker are in the object store and the broker has confirmed the job message and its expiry
check (publisher confirms). No worker runs, so jobs only queue. Each row also gives the gateway
process's CPU time per submission.

The same run then measures what this machine allows at all, each alone and with the same 64-way
concurrency: a no-op aiohttp handler driven by the same client, the store's small writes through
the project's store client, and confirmed persistent publishes to a quorum queue. A submission
costs one handler, three store writes (two without a quota) and two confirmed publishes, so
adding those costs gives the most this machine could accept with everything on it
(`machine_ceiling_per_s`, and `machine_ceiling_unlimited_per_s` for the key without a quota).

    python bench/gateway_throughput.py --out bench/results/gateway-throughput.json
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import aio_pika
import aiohttp
from harness import AUTH, bench_stack, machine, percentiles, write_result

from scripts import devstack

# What one submission does, for the machine ceiling.
STORE_WRITES = {"quota": 3, "unlimited": 2}  # record, index entry, and a quota marker for a key with a quota
KEY_QUOTAS = {"quota": 10_000_000, "unlimited": "unlimited"}
CONFIRMED_PUBLISHES = 2  # job message, expiry check
CEILING_CLIENTS = 64


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def drive(
    urls: list[str], clients: int, seconds: float, body: dict, headers: dict
) -> tuple[float, list[float], dict]:
    """POST `body` from `clients` concurrent clients for `seconds`, client n to urls[n % len(urls)]:
    (elapsed, 202 latencies, statuses)."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    deadline = time.perf_counter() + seconds
    async with aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(limit=clients)) as http:

        async def client(url: str) -> None:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                async with http.post(url, json=body) as response:
                    await response.read()
                    statuses[response.status] = statuses.get(response.status, 0) + 1
                if response.status == 202:
                    latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(client(urls[n % len(urls)]) for n in range(clients)))
        return time.perf_counter() - started, latencies, statuses


async def load(gateways: list[str], gateway_pids: list[int], clients: int, seconds: float) -> dict:
    cpu_before = sum(cpu_seconds(pid) for pid in gateway_pids)
    urls = [f"{gateway}/api/v1/generate/text-to-video" for gateway in gateways]
    elapsed, latencies, statuses = await drive(
        urls, clients, seconds, {"prompt": "throughput", "model": "ltx-tiny"}, AUTH
    )
    cpu = sum(cpu_seconds(pid) for pid in gateway_pids) - cpu_before
    return {
        "gateways": len(gateways),
        "clients": clients,
        "seconds": round(elapsed, 2),
        "accepted": len(latencies),
        "statuses": statuses,
        "per_s": round(len(latencies) / elapsed, 1),
        **percentiles(latencies),
        "gateway_cpu_ms_per_submission": round(cpu * 1000 / max(len(latencies), 1), 2),
        "gateway_cpu_share": round(cpu / elapsed, 2),
    }


NOOP_SERVER = """
import sys, uuid
from aiohttp import web
async def accept(request):
    await request.json()
    return web.json_response({"job_id": str(uuid.uuid4()), "status": "queued"}, status=202)
app = web.Application()
app.router.add_post("/", accept)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""


async def noop_http(seconds: float) -> float:
    """Requests/s of an aiohttp handler that only parses the body and answers 202."""
    port = devstack.free_port_block(1)
    server = subprocess.Popen([sys.executable, "-c", NOOP_SERVER, str(port)])
    try:
        devstack.wait_until(lambda: devstack.port_open("127.0.0.1", port), 30, "no-op server", server)
        elapsed, latencies, _ = await drive(
            [f"http://127.0.0.1:{port}/"], CEILING_CLIENTS, seconds, {"prompt": "throughput", "model": "ltx-tiny"}, {}
        )
        return len(latencies) / elapsed
    finally:
        devstack.stop_pid(server.pid)


async def store_writes(env: dict[str, str], seconds: float) -> float:
    """Small writes/s through the project's store client (common/store.py) to the bench store."""
    os.environ.update({k: v for k, v in env.items() if k.startswith("VIDEOGEN_")})
    from common.settings import CommonSettings
    from common.store import ObjectStore

    store = ObjectStore(CommonSettings())
    done = 0
    deadline = time.perf_counter() + seconds

    async def writer() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await store.put_bytes(f"bench/{uuid.uuid4()}", b"{}" * 600, "application/json")
            done += 1

    started = time.perf_counter()
    try:
        await asyncio.gather(*(writer() for _ in range(CEILING_CLIENTS)))
    finally:
        await store.close()
    return done / (time.perf_counter() - started)


async def confirmed_publishes(amqp_url: str, seconds: float) -> float:
    """Persistent messages/s published with confirms to a quorum queue."""
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(
            f"bench-ceiling-{uuid.uuid4().hex[:8]}", durable=True, arguments={"x-queue-type": "quorum"}
        )
        done = 0
        deadline = time.perf_counter() + seconds

        async def publisher() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                message = aio_pika.Message(b"x" * 900, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
                await channel.default_exchange.publish(message, routing_key=queue.name)
                done += 1

        started = time.perf_counter()
        await asyncio.gather(*(publisher() for _ in range(CEILING_CLIENTS)))
        rate = done / (time.perf_counter() - started)
        await queue.delete(if_unused=False, if_empty=False)
        return rate
    finally:
        await connection.close()


def ceilings(env: dict[str, str], seconds: float) -> dict:
    http = asyncio.run(noop_http(seconds))
    store = asyncio.run(store_writes(env, seconds))
    broker = asyncio.run(confirmed_publishes(env["VIDEOGEN_AMQP_URL"], seconds))

    def ceiling(writes: int) -> int:
        return round(1 / (1 / http + writes / store + CONFIRMED_PUBLISHES / broker))

    return {
        "noop_http_per_s": round(http),
        "store_writes_per_s": round(store),
        "confirmed_publishes_per_s": round(broker),
        "per_submission": {
            "store_writes": STORE_WRITES["quota"],
            "store_writes_unlimited": STORE_WRITES["unlimited"],
            "confirmed_publishes": CONFIRMED_PUBLISHES,
            "requests": 1,
        },
        "machine_ceiling_per_s": ceiling(STORE_WRITES["quota"]),
        "machine_ceiling_unlimited_per_s": ceiling(STORE_WRITES["unlimited"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="per concurrency level")
    parser.add_argument("--clients", default="1,16,64")
    parser.add_argument("--no-ceilings", action="store_true", help="skip measuring the machine's ceilings")
    parser.add_argument(
        "--gateways", default="1", help="gateway processes to spread the clients over, e.g. 1,2 (one stack each)"
    )
    parser.add_argument(
        "--keys", default="quota,unlimited", help="the API keys to submit with: with a job quota, without one"
    )
    parser.add_argument("--out", default="bench/results/gateway-throughput.json")
    args = parser.parse_args()
    rows, limits = [], None
    for kind, count in ((k, int(g)) for k in args.keys.split(",") for g in args.gateways.split(",")):
        with bench_stack(quota=KEY_QUOTAS[kind]) as stack:
            gateways = [stack.gateway_url] + [stack.start_gateway(f"gateway-{n}") for n in range(1, count)]
            pids = [proc.pid for proc in stack.procs]
            asyncio.run(load(gateways, pids, 4, 2.0))  # warm-up: connections, first store writes
            for clients in (int(c) for c in args.clients.split(",")):
                row = {"key": kind} | asyncio.run(load(gateways, pids, clients, args.seconds))
                print(
                    f"key with {'a quota' if kind == 'quota' else 'no quota'}, "
                    f"{count} gateway(s), {clients:>3} clients: {row['per_s']:>7.1f} submissions/s  "
                    f"p50 {row['p50_ms']} ms  p99 {row['p99_ms']} ms  gateway CPU "
                    f"{row['gateway_cpu_ms_per_submission']} ms/submission ({row['gateway_cpu_share']:.0%} of a core)  "
                    f"statuses {row['statuses']}",
                    flush=True,
                )
                rows.append(row)
            if limits is None and not args.no_ceilings:
                limits = ceilings(stack.env, min(args.seconds, 5.0))
    if limits:
        print(
            f"this machine, each alone: no-op handler {limits['noop_http_per_s']}/s, store writes "
            f"{limits['store_writes_per_s']}/s, confirmed publishes {limits['confirmed_publishes_per_s']}/s; "
            f"a submission's share of all three: at most {limits['machine_ceiling_per_s']} submissions/s "
            f"({limits['machine_ceiling_unlimited_per_s']}/s without a quota marker)",
            flush=True,
        )
    write_result(
        args.out,
        {
            "benchmark": "gateway_throughput",
            **machine(),
            "goal": ">= 2000 submissions/s and p99 < 50 ms on one gateway process",
            "rows": rows,
            "ceilings": limits,
        },
    )


if __name__ == "__main__":
    main()
