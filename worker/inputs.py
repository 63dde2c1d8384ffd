"""Decode a job's stored inputs into what the pipelines take: PIL images, cropped to the output size."""

from __future__ import annotations

import io

from PIL import Image, ImageOps, UnidentifiedImageError

from common.media import open_video


def fit(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale and centre-crop to the output size, so the picture is never stretched."""
    return ImageOps.fit(image.convert("RGB"), (width, height), method=Image.Resampling.LANCZOS)


def load_image(data: bytes, width: int, height: int) -> Image.Image:
    try:
        opened = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:  # its message shows the buffer's repr, an address
        raise ValueError("not an image file") from None
    with opened as image:
        return fit(image, width, height)


def load_video(data: bytes, num_frames: int, width: int, height: int) -> list[Image.Image]:
    """The first `num_frames` frames of the video (the gateway checked it has that many)."""
    frames: list[Image.Image] = []
    with open_video(data) as container:  # the gateway's demuxer, never one FFmpeg probes for
        for frame in container.decode(video=0):
            frames.append(fit(frame.to_image(), width, height))
            if len(frames) == num_frames:
                break
    if len(frames) < num_frames:
        raise ValueError(f"the input video has {len(frames)} frames; the job needs {num_frames}")
    return frames
