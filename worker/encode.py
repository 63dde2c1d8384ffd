"""MP4 writing and reading with PyAV: H.264, yuv420p, moov atom first (+faststart) for streaming."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    width: int
    height: int
    fps: float
    codec: str
    pix_fmt: str


def encode_mp4(frames: np.ndarray, fps: int, path: Path, crf: int = 18, preset: str = "veryfast") -> None:
    """Write uint8 RGB frames shaped (frames, height, width, 3)."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames shaped (F, H, W, 3), got {frames.dtype} {frames.shape}")
    _, height, width, _ = frames.shape
    if width % 2 or height % 2:
        raise ValueError(f"H.264 with yuv420p needs even width and height, got {width}x{height}")
    with av.open(str(path), mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(crf), "preset": preset}
        for rgb in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def probe_mp4(path: Path) -> VideoInfo:
    """Read back what a client would see: decoded frame count, size, frame rate, codec."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        count = sum(1 for _ in container.decode(stream))
        return VideoInfo(
            num_frames=count,
            width=stream.codec_context.width,
            height=stream.codec_context.height,
            fps=float(stream.average_rate or stream.base_rate or 0),
            codec=stream.codec_context.name,
            pix_fmt=stream.codec_context.pix_fmt or "",
        )
