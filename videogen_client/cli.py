"""`videogen`: submit, follow, list and cancel jobs of a videogen gateway from the command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from videogen_client import __version__
from videogen_client.client import DEFAULT_URL, AsyncClient
from videogen_client.errors import AuthenticationError, VideogenError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
MODE_SHORT = {"text-to-video": "t2v", "image-to-video": "i2v", "video-to-video": "v2v"}


def build_parser() -> argparse.ArgumentParser:
    # --url and --api-key are accepted before or after the command.
    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument(
        "--url",
        default=argparse.SUPPRESS,
        help=f"the gateway's base URL (default: $VIDEOGEN_URL, else {DEFAULT_URL})",
    )
    connection.add_argument(
        "--api-key", default=argparse.SUPPRESS, metavar="KEY", help="the API key (default: $VIDEOGEN_API_KEY)"
    )
    parser = argparse.ArgumentParser(
        prog="videogen",
        description="Generate videos with a videogen gateway, and list, follow and cancel its jobs.",
        parents=[connection],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = commands.add_parser(
        "generate",
        parents=[connection],
        help="submit a job (text-, image- or video-to-video)",
        description="Submit a job. Without --wait, print its id and status; with --wait (or --out), follow "
        "it with a progress bar and save the MP4.",
    )
    gen.set_defaults(command_parser=gen)
    gen.add_argument("prompt", help="what the video shows")
    source = gen.add_mutually_exclusive_group()
    source.add_argument("--image", type=Path, metavar="FILE", help="image-to-video from this PNG, JPEG or WebP")
    source.add_argument("--video", type=Path, metavar="FILE", help="video-to-video from this video")
    gen.add_argument("--model", help="model id (default: the gateway's default model)")
    gen.add_argument("--width", type=int, metavar="W")
    gen.add_argument("--height", type=int, metavar="H")
    gen.add_argument("--frames", type=int, metavar="N", dest="num_frames", help="number of frames")
    gen.add_argument("--fps", type=int, metavar="F", help="frame rate of the MP4")
    gen.add_argument("--steps", type=int, metavar="S", help="denoising steps (num_inference_steps)")
    gen.add_argument("--guidance", type=float, metavar="G", help="guidance scale")
    gen.add_argument("--seed", type=int, metavar="X")
    gen.add_argument("--priority", choices=["high", "normal", "low"])
    gen.add_argument("--tier", choices=["standard", "fast"], help="fast: the model's cache acceleration, if any")
    gen.add_argument("--negative-prompt", metavar="TEXT")
    gen.add_argument("--strength", type=float, metavar="S", help="video-to-video only: how far to move from the input")
    gen.add_argument("--idempotency-key", metavar="KEY", help="a retry with the same key returns the same job")
    gen.add_argument("--wait", action="store_true", help="follow the job to its end and download the video")
    gen.add_argument(
        "--out", type=Path, metavar="FILE", help="where to save the MP4 (implies --wait; default <job_id>.mp4)"
    )
    gen.add_argument("--timeout", type=float, metavar="SECONDS", help="with --wait: give up after this long")
    gen.add_argument("--no-progress", action="store_true", help="with --wait: no progress bar")

    jobs = commands.add_parser("jobs", parents=[connection], help="list your jobs, newest first")
    jobs.add_argument("--status", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    jobs.add_argument("--model", help="only jobs of this model")
    jobs.add_argument("--limit", type=int, metavar="N", help="jobs per page, 1 to 100 (default 20)")
    jobs.add_argument("--cursor", help="the next page: the cursor printed under the previous one")

    job = commands.add_parser("job", parents=[connection], help="show one job as JSON")
    job.add_argument("job_id", metavar="ID")

    cancel = commands.add_parser("cancel", parents=[connection], help="cancel a job")
    cancel.add_argument("job_id", metavar="ID")

    commands.add_parser("models", parents=[connection], help="list the models, their defaults and workers")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "generate":
        _check_generate(args.command_parser, args)
    try:
        return asyncio.run(_run(args))
    except VideogenError as exc:
        _print_error(exc)
        return EXIT_ERROR
    except OSError as exc:  # reading the input file or writing the video
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _check_generate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors (exit status 2) caught before anything is sent."""
    if args.strength is not None and args.video is None:
        parser.error("--strength applies to video-to-video only (give --video)")
    for option in ("image", "video"):
        path: Path | None = getattr(args, option)
        if path is not None and not path.is_file():
            parser.error(f"--{option} {path}: no such file")
    if args.out is not None and not args.out.is_dir() and not args.out.parent.is_dir():
        parser.error(f"--out {args.out}: directory {args.out.parent} does not exist")


async def _run(args: argparse.Namespace) -> int:
    async with AsyncClient(getattr(args, "url", None), getattr(args, "api_key", None)) as client:
        if args.command == "generate":
            return await _generate(client, args)
        if args.command == "jobs":
            page = await client.list_jobs(status=args.status, model=args.model, limit=args.limit, cursor=args.cursor)
            _print_jobs(page)
        elif args.command == "job":
            print(json.dumps(await client.get_job(args.job_id), indent=2))
        elif args.command == "cancel":
            _print_cancel(await client.cancel(args.job_id))
        elif args.command == "models":
            _print_models(await client.models())
    return EXIT_OK


async def _generate(client: AsyncClient, args: argparse.Namespace) -> int:
    accepted = await client.generate(
        args.prompt,
        image=args.image,
        video=args.video,
        model=args.model,
        width=args.width,
        height=args.height,
        num_frames=args.num_frames,
        fps=args.fps,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        priority=args.priority,
        tier=args.tier,
        negative_prompt=args.negative_prompt,
        strength=args.strength,
        idempotency_key=args.idempotency_key,
    )
    job_id = accepted["job_id"]
    print(f"job {job_id} {accepted['status']}: {_summary(accepted)}")
    if accepted.get("workers") == 0:
        print(f"note: no worker serves {accepted['model']} right now; the job waits in its queue", file=sys.stderr)
    if not (args.wait or args.out):
        print(f"follow it with: videogen job {job_id}")
        return EXIT_OK

    progress = None if args.no_progress else ProgressBar()
    try:
        job = await client.wait(job_id, timeout=args.timeout, on_event=progress)
    except (KeyboardInterrupt, asyncio.CancelledError):  # Ctrl-C: asyncio.run cancels this task
        print(f"\nstopped following job {job_id}; it goes on (videogen cancel {job_id} stops it)", file=sys.stderr)
        raise
    finally:
        if progress is not None:
            progress.close()
    if job["status"] != "succeeded":
        error = job.get("error") or {}
        why = f"{error.get('code')}: {error.get('message')}" if error else job.get("message") or job["status"]
        print(f"job {job_id} {job['status']}: {why}", file=sys.stderr)
        return EXIT_ERROR
    path = await client.download(job, args.out)
    result = job["result"]
    print(
        f"saved {path} ({result.get('bytes')} bytes: {result.get('num_frames')} frames, "
        f"{result.get('width')}x{result.get('height')} at {_number(result.get('fps'))} fps)"
    )
    return EXIT_OK


class _Bar(tqdm):
    """A tqdm bar with a `{notes}` field for its format."""

    def __init__(self, *args: Any, notes: str = "", **kwargs: Any) -> None:
        self.notes = notes
        super().__init__(*args, **kwargs)

    @property
    def format_dict(self) -> dict[str, Any]:
        return {**super().format_dict, "notes": self.notes}


class ProgressBar:
    """A tqdm bar (on stderr) fed by a job's events: phase, progress, step k/N, the gateway's ETA."""

    def __init__(self) -> None:
        self._bar: _Bar | None = None  # drawn from the first event on

    def __call__(self, event: dict[str, Any]) -> None:
        notes = []
        if event.get("step") and event.get("total_steps"):
            notes.append(f"step {event['step']}/{event['total_steps']}")
        if event.get("eta_s") is not None:
            notes.append(f"ETA {_duration(event['eta_s'])}")
        if event.get("phase") == "queued" and event.get("queue_position") is not None:
            notes.append(f"queue position {event['queue_position']}")
        if event.get("message"):
            notes.append(str(event["message"]))
        phase = f"{event.get('phase', ''):<10} "
        percent = round(100 * float(event.get("progress") or 0.0), 1)
        if self._bar is None:
            self._bar = _Bar(
                total=100,
                initial=percent,
                desc=phase,
                notes=", ".join(notes),
                bar_format="{desc}{percentage:3.0f}%|{bar}| {notes}",
                dynamic_ncols=True,
            )
            return
        self._bar.notes = ", ".join(notes)
        self._bar.n = percent
        self._bar.set_description_str(phase, refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _summary(accepted: dict[str, Any]) -> str:
    request = accepted.get("request") or {}
    parts = [f"model {accepted.get('model')}", str(accepted.get("mode"))]
    if request.get("width"):
        parts.append(
            f"{request['width']}x{request['height']}, {request['num_frames']} frames at {request['fps']} fps, "
            f"{request['num_inference_steps']} steps, seed {request.get('seed')}"
        )
    if accepted.get("queue_position") is not None:
        parts.append(f"{accepted['queue_position']} ahead in the queue")
    return ", ".join(parts)


def _print_jobs(page: dict[str, Any]) -> None:
    rows = [
        [
            job.get("job_id", ""),
            job.get("status", ""),
            job.get("phase", ""),
            f"{100 * float(job.get('progress') or 0):.0f}%",
            job.get("model", ""),
            job.get("mode", ""),
            (job.get("created_at") or "")[:19].replace("T", " "),
        ]
        for job in page.get("jobs", [])
    ]
    if rows:
        _print_table(["JOB ID", "STATUS", "PHASE", "PROGRESS", "MODEL", "MODE", "CREATED (UTC)"], rows)
    else:
        print("no jobs")
    if page.get("next_cursor"):
        print(f"\nmore: videogen jobs --cursor {page['next_cursor']}")


def _print_models(listing: dict[str, Any]) -> None:
    default = listing.get("default_model")
    rows = []
    for model in listing.get("models", []):
        d = model.get("defaults") or {}
        rows.append(
            [
                model.get("id", "") + (" *" if model.get("id") == default else ""),
                model.get("family", ""),
                ",".join(MODE_SHORT.get(m, m) for m in model.get("modes", [])),
                f"{d.get('width')}x{d.get('height')}, {d.get('num_frames')} frames, {d.get('fps')} fps, "
                f"{d.get('num_inference_steps')} steps",
                _count(model.get("workers")),
                _count(model.get("queue_depth")),
            ]
        )
    _print_table(["MODEL", "FAMILY", "MODES", "DEFAULTS", "WORKERS", "QUEUED"], rows)
    if default:
        print(f"\n* default model ({default})")


def _print_cancel(job: dict[str, Any]) -> None:
    job_id, status = job.get("job_id"), job.get("status")
    if status == "cancelled":
        print(f"job {job_id} cancelled ({job.get('message') or 'cancelled'})")
    elif status == "running":
        print(f"job {job_id} is stopping: it was running, and ends cancelled unless it finished meanwhile")
    else:
        print(f"job {job_id} had already ended: {status}")


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=False)]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _print_error(exc: VideogenError) -> None:
    print(f"error: {exc.describe()}", file=sys.stderr)
    if isinstance(exc, AuthenticationError):
        print(
            "hint: pass --api-key or set VIDEOGEN_API_KEY (the local stack's key is in .stack/api-key)",
            file=sys.stderr,
        )
    elif exc.retry_after is not None:
        print(f"hint: retry in {exc.retry_after:g} s", file=sys.stderr)


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, int | float) else str(value)


def _count(value: Any) -> str:
    return "?" if value is None else str(value)


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s"


if __name__ == "__main__":
    sys.exit(main())
