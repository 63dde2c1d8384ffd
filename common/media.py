"""Which demuxer may read an uploaded video: chosen from the file's first bytes, never by FFmpeg.

FFmpeg's own probing also picks demuxers that read *other* inputs named inside the file: an
ffconcat playlist (`file ...` lines) reads files from the process's disk, an SDP description
opens UDP ports and waits for RTP, HLS and DASH fetch playlists and segments. An upload is
opened only with one of the real container demuxers below, forced, so none of those is ever used.
"""

from __future__ import annotations

import io
from typing import Any

import av

# What is accepted, for messages and docs.
VIDEO_FORMATS = "MP4/MOV, WebM/Matroska, AVI, MPEG-TS, animated GIF, or a single PNG, JPEG or WebP image"


def video_demuxer(data: bytes) -> str | None:
    """The FFmpeg demuxer for a container recognised by its signature, or None."""
    head = data[:16]
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip", b"pnot"):
        return "mov"  # MP4, MOV, M4V, 3GP: ISO base media / QuickTime atoms
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "matroska"  # Matroska and WebM: an EBML header
    if head.startswith(b"RIFF") and head[8:12] == b"AVI ":
        return "avi"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png_pipe"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg_pipe"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "webp_pipe"
    if len(data) >= 3 * 188 and all(data[n] == 0x47 for n in (0, 188, 376)):
        return "mpegts"  # 188-byte packets, each starting with the sync byte
    return None


def open_video(data: bytes) -> Any:
    """The upload opened with its forced demuxer (a context manager); ValueError, naming what is
    accepted, when its first bytes are none of those containers."""
    demuxer = video_demuxer(data)
    if demuxer is None:
        raise ValueError(f"not a video container this service reads ({VIDEO_FORMATS})")
    return av.open(io.BytesIO(data), format=demuxer)
