"""Submit one text-to-video job to the local gateway, show its progress live, download the MP4."""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.devstack import StackState  # noqa: E402
from worker.encode import probe_mp4  # noqa: E402


async def run(gateway: str, token: str, key_source: str, prompt: str, out_dir: Path) -> int:
    auth = {"Authorization": f"Bearer {token}"}  # for the gateway only: presigned links carry their own
    async with aiohttp.ClientSession(raise_for_status=False) as http:
        async with http.post(
            f"{gateway}/api/v1/generate/text-to-video", json={"prompt": prompt}, headers=auth
        ) as response:
            body = await response.json()
            if response.status != 202:
                whose = f" (the API key from {key_source})" if response.status in (401, 403) else ""
                print(f"submission refused ({response.status}){whose}: {body}", file=sys.stderr)
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


DEFAULT_KEY_FILE = ROOT / ".stack" / "api-key"
DEFAULT_PROMPT = "a red fox running through fresh snow, golden hour"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/demo",
        description=__doc__ + " Brings the local stack up first (scripts/stack up), unless --gateway is given.",
    )
    parser.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT, help=f"default: {DEFAULT_PROMPT!r}")
    parser.add_argument("--gateway", help="submit to this gateway instead, without bringing the local stack up")
    parser.add_argument("--port-offset", type=int, help="for scripts/stack up: add this to every port of the stack")
    parser.add_argument("--namespace", help="for scripts/stack up: the stack's broker namespace")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs")
    parser.add_argument(
        "--api-key-file",
        type=Path,
        help=f"file holding the API key (default: VIDEOGEN_API_KEY if set, else {DEFAULT_KEY_FILE.relative_to(ROOT)}, "
        "which scripts/stack up writes)",
    )
    args = parser.parse_args(argv)
    if args.gateway is not None and (args.port_offset is not None or args.namespace is not None):
        parser.error("--port-offset and --namespace are for the local stack; --gateway names another gateway")
    # A file asked for is read (and one that is not there said) before anything starts; the stack's
    # own key file may be written by `up`.
    asked = api_key(args.api_key_file) if args.api_key_file is not None else None
    gateway = args.gateway
    if gateway is None:
        up = [sys.executable, str(ROOT / "scripts" / "devstack.py"), "up"]
        if args.port_offset is not None:
            up += ["--port-offset", str(args.port_offset)]
        if args.namespace is not None:
            up += ["--namespace", args.namespace]
        returncode = run_to_its_end(up)
        if returncode != 0:
            return returncode  # scripts/stack said why (130: interrupted)
        gateway = StackState.load().gateway_url
    token, source = asked or api_key(None)
    if not token:
        print(
            f"no API key: {source} is empty or missing (scripts/stack up writes one), or set VIDEOGEN_API_KEY",
            file=sys.stderr,
        )
        return 1
    try:
        return asyncio.run(run(gateway, token, source, args.prompt, args.out))
    except aiohttp.ClientConnectionError as exc:
        print(f"cannot reach the gateway at {gateway}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("scripts/demo: interrupted (the job may still run: the stack is up)", file=sys.stderr)
        return 130


def run_to_its_end(command: list[str]) -> int:
    """Run a command to its end, also when Ctrl-C comes: the command gets the interrupt too (same
    process group) and stops what it was starting; killing it then (as subprocess.run does after
    a quarter of a second) would leave that half done."""
    proc = subprocess.Popen(command, cwd=ROOT)
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            continue


def api_key(key_file: Path | None) -> tuple[str | None, str]:
    """The API key and where it came from: the file asked for, else VIDEOGEN_API_KEY, else the
    stack's key file."""
    if key_file is None and (token := os.environ.get("VIDEOGEN_API_KEY")):
        return token.strip(), "VIDEOGEN_API_KEY"
    path = key_file or DEFAULT_KEY_FILE
    try:
        return path.read_text().strip(), str(path)
    except FileNotFoundError:
        if key_file is not None:
            raise SystemExit(f"no API key file at {key_file}") from None
        return None, str(path)
    except OSError as exc:
        raise SystemExit(f"cannot read the API key file {path}: {exc.strerror}") from None


if __name__ == "__main__":
    sys.exit(main())
