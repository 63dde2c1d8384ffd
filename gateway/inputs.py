"""Check uploaded images and videos before anything is queued: decodable, of a known kind, bounded."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import av
from PIL import Image, UnidentifiedImageError

from common.media import VIDEO_FORMATS, open_video, video_demuxer
from gateway.errors import ApiError, problem

IMAGE_FORMATS = {
    "PNG": ("png", "image/png"),
    "JPEG": ("jpg", "image/jpeg"),
    # A JPEG with a multi-picture segment (phones' HDR gain maps, depth maps): a JPEG to every reader.
    "MPO": ("jpg", "image/jpeg"),
    "WEBP": ("webp", "image/webp"),
}
# Most scans a JPEG may have (progressive encoders write about 10): each scan is decoded over the
# whole picture, so a small file of thousands of scans would hold a core for minutes.
MAX_JPEG_SCANS = 100


@dataclass(frozen=True)
class CheckedInput:
    """An input that passed its checks; `ext` comes from its content, never from a client's file name."""

    name: str
    data: bytes
    ext: str
    content_type: str
    width: int
    height: int
    frames: int = 1


def bad_input(field: str, rule: str, message: str) -> ApiError:
    return ApiError(422, "invalid_input", message, [problem(field, rule, message)])


def check_image(data: bytes, max_pixels: int) -> CheckedInput:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                kind, (width, height) = image.format, image.size
                if kind not in IMAGE_FORMATS:
                    raise bad_input(
                        "image", "format", f"image: {kind or 'unknown'} images are not accepted; send PNG, JPEG or WebP"
                    )
                # Bound the pixel count before decoding: a small file can expand to gigabytes.
                if width * height > max_pixels:
                    raise bad_input(
                        "image",
                        "max_pixels",
                        f"image: {width}x{height} is {width * height} pixels; the limit is {max_pixels}",
                    )
                # And a JPEG's scans (start-of-scan markers: 0xFF 0xDA never occurs in coded data).
                if kind in ("JPEG", "MPO") and (scans := data.count(b"\xff\xda")) > MAX_JPEG_SCANS:
                    raise bad_input(
                        "image", "max_scans", f"image: a JPEG of {scans} scans; the limit is {MAX_JPEG_SCANS}"
                    )
                image.load()
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise bad_input("image", "max_pixels", f"image: too many pixels ({exc})") from exc
    except Exception as exc:
        reason = "not an image file" if isinstance(exc, UnidentifiedImageError) else str(exc)
        raise bad_input("image", "decodable", f"image: not a readable PNG, JPEG or WebP image ({reason})") from exc
    ext, content_type = IMAGE_FORMATS[kind]
    return CheckedInput("image", data, ext, content_type, width, height)


def check_video(data: bytes, min_frames: int, max_frames: int, max_seconds: float, max_side: int) -> CheckedInput:
    """Probe with PyAV and decode up to `max_frames` frames: the worker must be able to read it too."""
    if video_demuxer(data) is None:
        raise bad_input("video", "format", f"video: not a video container this service reads ({VIDEO_FORMATS})")
    try:
        with open_video(data) as container:
            if not container.streams.video:
                raise bad_input("video", "video_stream", "video: the file has no video stream")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            if max(width, height) > max_side:
                raise bad_input(
                    "video", "max_size", f"video: {width}x{height} is larger than {max_side} pixels on a side"
                )
            seconds = float(container.duration / av.time_base) if container.duration else 0.0
            if seconds > max_seconds:
                raise bad_input(
                    "video", "max_duration", f"video: {seconds:.1f} s is longer than the limit of {max_seconds:g} s"
                )
            frames = 0
            for frame in container.decode(stream):
                # The stream's size is its first frame's: a later frame can be larger.
                if max(frame.width, frame.height) > max_side:
                    raise bad_input(
                        "video",
                        "max_size",
                        f"video: frame {frames + 1} is {frame.width}x{frame.height}, larger than {max_side} pixels "
                        "on a side",
                    )
                frames += 1
                if frames > max_frames:
                    raise bad_input("video", "max_frames", f"video: more than {max_frames} frames")
            container_format = container.format.name
    except ApiError:
        raise
    except Exception as exc:
        reason = exc.strerror if isinstance(exc, av.FFmpegError) and exc.strerror else str(exc)  # not FFmpeg's errno
        raise bad_input("video", "decodable", f"video: not a readable video file ({reason})") from exc
    if frames < min_frames:
        raise bad_input(
            "video",
            "min_frames",
            f"video: has {frames} frames; num_frames={min_frames} needs at "
            f"least {min_frames} (lower num_frames or send a longer video)",
        )
    ext = "mp4" if "mp4" in container_format else container_format.split(",")[0]
    return CheckedInput("video", data, ext, "application/octet-stream", width, height, frames)
