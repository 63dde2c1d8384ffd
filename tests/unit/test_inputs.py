"""The gateway's checks of uploaded images and videos (`gateway/inputs.py`) against crafted files."""

from __future__ import annotations

import base64
import binascii
import io
import struct
import threading
import time

import av
import pytest
from PIL import Image

from gateway import handlers
from gateway.errors import ApiError
from gateway.inputs import MAX_JPEG_SCANS, check_image, check_video
from worker.inputs import load_video


def _jpeg_with_repeated_scan(side: int, copies: int) -> bytes:
    """A progressive JPEG whose second scan (an AC refinement) is repeated `copies` times: each
    copy adds a few bytes, and a decoder makes a pass over the whole picture for it."""
    buf = io.BytesIO()
    Image.new("L", (side, side), 128).save(buf, "JPEG", progressive=True, quality=90)
    data, at, scans = buf.getvalue(), 2, []
    while data[at + 1] != 0xD9:  # segment by segment up to the end-of-image marker
        marker, length = data[at + 1], struct.unpack(">H", data[at + 2 : at + 4])[0]
        end = at + 2 + length
        if marker == 0xDA:  # a scan: its coded data runs to the next marker
            while data[end] != 0xFF or data[end + 1] == 0 or 0xD0 <= data[end + 1] <= 0xD7:
                end += 1
            scans.append((at, end))
        at = end
    (_, first_end), (_, second_end) = scans[0], scans[1]
    return data[:first_end] + data[first_end:second_end] * copies + data[second_end:]


def test_a_jpeg_of_thousands_of_scans_is_refused_before_it_is_decoded() -> None:
    data = _jpeg_with_repeated_scan(1024, 5000)
    started = time.monotonic()
    with pytest.raises(ApiError) as refused:
        check_image(data, 4096 * 4096)
    assert time.monotonic() - started < 1.0, "it was decoded"
    assert refused.value.details[0]["rule"] == "max_scans" and "the limit is 100" in refused.value.message
    ordinary = _jpeg_with_repeated_scan(64, 1)
    assert check_image(ordinary, 4096 * 4096).ext == "jpg" and ordinary.count(b"\xff\xda") < MAX_JPEG_SCANS


def test_a_jpeg_with_a_multi_picture_segment_is_a_jpeg() -> None:
    """Phones write HDR gain maps and depth maps so (Pillow reads them as MPO)."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 48)).save(buf, "MPO", save_all=True, append_images=[Image.new("RGB", (32, 24))])
    checked = check_image(buf.getvalue(), 4096 * 4096)
    assert (checked.ext, checked.content_type, checked.width, checked.height) == ("jpg", "image/jpeg", 64, 48)


def _jpeg(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (40, 90, 160)).save(buf, "JPEG", quality=10)
    return buf.getvalue()


def test_a_video_whose_later_frames_are_larger_than_its_first_is_refused() -> None:
    """The stream reports its first frame's size (64x64, within the limit); the frames after it
    are 5000x5000: refused at the first of them, as `max_size`."""
    small, big = _jpeg(64, 64), _jpeg(5000, 5000)
    buf = io.BytesIO()
    with av.open(buf, "w", format="matroska") as out:
        stream = out.add_stream("mjpeg", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuvj420p"
        for n in range(10):
            packet = av.Packet(small if n == 0 else big)
            packet.stream, packet.pts, packet.dts = stream, n * 125, n * 125
            out.mux(packet)
    with pytest.raises(ApiError) as refused:
        check_video(buf.getvalue(), 9, 1000, 120, 4096)
    assert refused.value.details[0]["rule"] == "max_size" and "frame 2 is 5000x5000" in refused.value.message


@pytest.mark.parametrize("size", [0, 1, 2, 3, 5, 6, 7, 12, 13, 30])
async def test_base64_decoded_in_pieces_reads_as_in_one_call(monkeypatch, size) -> None:
    """A long base64 file is decoded a piece at a time off the event loop: the same bytes, and
    the same refusals, as one `b64decode(validate=True)`."""
    monkeypatch.setattr(handlers, "BASE64_PIECE", 8)
    data = bytes(range(size))
    text = base64.b64encode(data).decode()
    assert await handlers._decode_base64("image", text) == data
    assert await handlers._decode_base64("image", "data:image/png;base64," + text) == data
    bad = [text + "A", text[:-1] + "*" if text else "*", text + "=" * 4 + text]
    if len(text) > 8:
        bad.append(text[:7] + "=" + text[8:])  # padding inside the first piece
    for wrong in bad:
        with pytest.raises(binascii.Error):
            base64.b64decode(wrong, validate=True)
        with pytest.raises(ApiError) as refused:
            await handlers._decode_base64("image", wrong)
        assert refused.value.details[0]["rule"] == "base64"


async def test_a_long_base64_file_is_decoded_off_the_event_loop_a_piece_at_a_time(monkeypatch) -> None:
    """The decoder holds the GIL while it runs: in one call on the loop, a 100 MiB file kept every
    other request waiting for about 0.6 s."""
    monkeypatch.setattr(handlers, "BASE64_PIECE", 8)
    calls, real = [], base64.b64decode

    def spy(text, validate=False):
        calls.append((threading.current_thread() is threading.main_thread(), len(text)))
        return real(text, validate=validate)

    monkeypatch.setattr(handlers.base64, "b64decode", spy)
    data = bytes(range(30))
    assert await handlers._decode_base64("image", base64.b64encode(data).decode()) == data
    assert calls == [(False, 8), (False, 8), (False, 8), (False, 8), (False, 8)]


@pytest.mark.parametrize("suffix", ["\n", "\u0661", " "])
def test_a_job_id_is_a_whole_uuid_and_nothing_after_it(suffix) -> None:
    job_id = "0b6f2ad6-4f7e-4c55-9b1f-3f0a2c1d9e11"
    assert handlers.parse_job_id(job_id) == job_id
    with pytest.raises(ApiError) as refused:
        handlers.parse_job_id(job_id + suffix)
    assert refused.value.status == 404


def _mp4(frames: int = 9) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for n in range(frames):
            frame = av.VideoFrame.from_image(Image.new("RGB", (64, 64), (n * 20, 90, 160)))
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return buf.getvalue()


# Files FFmpeg's probing would open with demuxers that read other inputs named inside them: a
# playlist of files on the server's disk, an SDP description (UDP ports, then a 20 s wait), HLS.
PLAYLISTS = {
    "ffconcat": b"ffconcat version 1.0\n" + b"file docs/performance.png\n" * 9,
    "sdp": b"v=0\no=- 0 0 IN IP4 127.0.0.1\ns=x\nc=IN IP4 127.0.0.1\nt=0 0\nm=video 5998 RTP/AVP 96\n"
    b"a=rtpmap:96 H264/90000\n",
    "hls": b"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nhttp://127.0.0.1:1/a.ts\n#EXT-X-ENDLIST\n",
}


@pytest.mark.parametrize("data", PLAYLISTS.values(), ids=PLAYLISTS.keys())
def test_descriptions_of_other_inputs_are_refused_before_ffmpeg_opens_them(data, monkeypatch) -> None:
    from common import media

    opened = []
    monkeypatch.setattr(media.av, "open", lambda *a, **k: opened.append(a) or pytest.fail("opened"))
    with pytest.raises(ApiError) as refused:
        check_video(data, 9, 1000, 120, 4096)
    assert refused.value.details[0]["rule"] == "format" and "MP4/MOV, WebM/Matroska" in refused.value.message
    with pytest.raises(ValueError, match="not a video container"):
        load_video(data, 9, 64, 64)
    assert opened == []


def test_real_containers_are_read_with_their_own_demuxer() -> None:
    mp4 = _mp4()
    assert check_video(mp4, 9, 1000, 120, 4096).frames == 9
    assert len(load_video(mp4, 9, 32, 32)) == 9
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    with pytest.raises(ApiError) as one_frame:  # a single image is a one-frame video, as before
        check_video(png.getvalue(), 9, 1000, 120, 4096)
    assert one_frame.value.details[0]["rule"] == "min_frames"
