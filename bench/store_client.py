"""The store client's cost: small writes and reads through common/store.py, two ways.

A gateway makes three small store writes per submission (record, index entry, quota marker), so
what one costs in the gateway's own CPU bounds how many submissions it can take. This starts an
S3 store of its own (SeaweedFS `weed mini`) and, 64 at a time for a fixed time each, alternating
two rounds, writes 1.2 kB objects and reads them back:

- `event loop`: `ObjectStore.put_bytes` / `get_bytes`, aiohttp requests signed with minio's
  helpers on the event loop (what the service uses);
- `minio thread`: the same calls made by minio's blocking client on the store's thread pool (how
  the service made them before).

For each it prints operations/s (client and store share this machine's cores) and the client
process's CPU time per operation (`resource.getrusage`), which is the figure that carries over
to other machines as a ratio.

    python bench/store_client.py --out bench/results/store-client.json
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import resource
import tempfile
import time
import uuid
from pathlib import Path

from harness import machine, write_result

from scripts import devstack

CLIENTS = 64
BODY = b"{}" * 600  # about the size of a job record


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(store, way: str, op: str, seconds: float, keys: list[str]) -> dict:
    def minio_read(key: str) -> bytes:
        response = store._client.get_object(store.bucket, key)
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    calls = {
        ("event loop", "write"): lambda key: store.put_bytes(key, BODY, "application/json"),
        ("event loop", "read"): store.get_bytes,
        ("minio thread", "write"): lambda key: store._run(
            store._client.put_object, store.bucket, key, io.BytesIO(BODY), len(BODY), content_type="application/json"
        ),
        ("minio thread", "read"): lambda key: store._run(minio_read, key),
    }
    call, done = calls[(way, op)], 0
    deadline = time.perf_counter() + seconds

    async def client(n: int) -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            key = f"bench/{uuid.uuid4()}" if op == "write" else keys[(done + n) % len(keys)]
            await call(key)
            done += 1

    cpu, started = cpu_seconds(), time.perf_counter()
    await asyncio.gather(*(client(n) for n in range(CLIENTS)))
    elapsed, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    return {
        "way": way,
        "op": op,
        "per_s": round(done / elapsed, 1),
        "client_cpu_ms_per_op": round(1000 * cpu / done, 3),
        "ops": done,
    }


async def run(endpoint: str, bucket: str, seconds: float, rounds: int) -> list[dict]:
    os.environ.update(
        VIDEOGEN_S3_ENDPOINT=endpoint,
        VIDEOGEN_S3_ACCESS_KEY="bench",
        VIDEOGEN_S3_SECRET_KEY="bench-secret-key",
        VIDEOGEN_S3_BUCKET=bucket,
    )
    from common.settings import CommonSettings
    from common.store import ObjectStore

    store = ObjectStore(CommonSettings())
    try:
        keys = [f"bench/read-{n}" for n in range(CLIENTS)]
        await asyncio.gather(*(store.put_bytes(key, BODY, "application/json") for key in keys))
        await measure(store, "event loop", "write", 1.0, keys)  # warm-up: connections on both sides
        await measure(store, "minio thread", "write", 1.0, keys)
        rows = []
        for n in range(1, rounds + 1):
            for op in ("write", "read"):
                for way in ("minio thread", "event loop"):
                    row = {"round": n} | await measure(store, way, op, seconds, keys)
                    print(
                        f"round {n}, {op:>5}s, {way:>12}: {row['per_s']:>7.1f}/s, client CPU "
                        f"{row['client_cpu_ms_per_op']} ms per {op}",
                        flush=True,
                    )
                    rows.append(row)
        return rows
    finally:
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="per way and operation")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default="bench/results/store-client.json")
    args = parser.parse_args()
    base = devstack.free_port_block(11)
    with tempfile.TemporaryDirectory(prefix="videogen-bench-store-") as tmp:
        proc, s3 = devstack.start_weed(
            Path(tmp) / "weed", base + 10, base, "bench", "bench-secret-key", "videogen-bench"
        )
        try:
            rows = asyncio.run(run(s3.endpoint, s3.bucket, args.seconds, args.rounds))
        finally:
            devstack.stop_pid(proc.pid)
    summary = {}
    for op in ("write", "read"):
        mine = [r for r in rows if r["op"] == op]
        loop = [r["client_cpu_ms_per_op"] for r in mine if r["way"] == "event loop"]
        thread = [r["client_cpu_ms_per_op"] for r in mine if r["way"] == "minio thread"]
        summary[f"{op}_cpu_thread_over_loop"] = round(sum(thread) / sum(loop), 2)
        print(f"{op}s: client CPU per {op}, minio thread / event loop: {summary[f'{op}_cpu_thread_over_loop']}x")
    write_result(
        args.out,
        {
            "benchmark": "store_client",
            **machine(),
            "clients": CLIENTS,
            "object_bytes": len(BODY),
            "rows": rows,
            "summary": summary,
        },
    )


if __name__ == "__main__":
    main()
