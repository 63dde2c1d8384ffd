"""Submit one text-to-video job to the local gateway, show its progress live, download the MP4."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.devstack import StackState  # noqa: E402
from worker.encode import probe_mp4  # noqa: E402


async def run(gateway: str, token: str, prompt: str, out_dir: Path) -> int:
    auth = {"Authorization": f"Bearer {token}"}  # for the gateway only: presigned links carry their own
    async with aiohttp.ClientSession(raise_for_status=False) as http:
        async with http.post(
            f"{gateway}/api/v1/generate/text-to-video", json={"prompt": prompt}, headers=auth
        ) as response:
            body = await response.json()
            if response.status != 202:
                print(f"submission refused ({response.status}): {body}", file=sys.stderr)
                return 1
        job_id = body["job_id"]
        req = body["request"]
        print(
            f"job {job_id} accepted: model {body['model']}, {req['width']}x{req['height']}, "
            f"{req['num_frames']} frames at {req['fps']} fps, {req['num_inference_steps']} steps"
        )

        final = None
        async with http.ws_connect(f"{gateway}/api/v1/ws", params={"job_id": job_id}, headers=auth) as ws:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                event = msg.json()
                step = f" step {event['step']}/{event['total_steps']}" if event.get("step") else ""
                print(
                    f"  [{event['seq']:>3}] {event['status']:<9} {event['phase']:<10}"
                    f" {event['progress'] * 100:5.1f}%{step}"
                )
                if "job" in event:
                    final = event["job"]
        if final is None or final["status"] != "succeeded":
            print(f"job ended without a video: {final and final.get('error')}", file=sys.stderr)
            return 1

        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{job_id}.mp4"
        async with http.get(final["result"]["url"]) as response:
            response.raise_for_status()
            path.write_bytes(await response.read())
    info = probe_mp4(path)
    print(f"\nsaved {path}")
    print(
        f"  frames: {info.num_frames}  size: {info.width}x{info.height}  fps: {info.fps:g}  "
        f"codec: {info.codec} ({info.pix_fmt})  bytes: {path.stat().st_size}"
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("prompt", nargs="?", default="a red fox running through fresh snow, golden hour")
    parser.add_argument(
        "--gateway", default=StackState.load().gateway_url, help="default: the gateway of scripts/stack up"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "outputs")
    parser.add_argument(
        "--api-key-file",
        type=Path,
        default=ROOT / ".stack" / "api-key",
        help="file holding the API key (scripts/stack up writes one); or set VIDEOGEN_API_KEY",
    )
    args = parser.parse_args()
    token = os.environ.get("VIDEOGEN_API_KEY") or (
        args.api_key_file.read_text().strip() if args.api_key_file.exists() else None
    )
    if not token:
        print(
            f"no API key: run scripts/stack up (it writes {args.api_key_file}) or set VIDEOGEN_API_KEY", file=sys.stderr
        )
        return 1
    return asyncio.run(run(args.gateway, token, args.prompt, args.out))


if __name__ == "__main__":
    sys.exit(main())
