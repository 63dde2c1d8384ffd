from __future__ import annotations

import numpy as np
import pytest

from worker.encode import encode_mp4, probe_mp4


def test_encode_reads_back(tmp_path) -> None:
    frames = np.random.default_rng(0).integers(0, 255, (17, 32, 64, 3), dtype=np.uint8)
    path = tmp_path / "v.mp4"
    encode_mp4(frames, 24, path)
    info = probe_mp4(path)
    assert (info.num_frames, info.width, info.height, info.fps) == (17, 64, 32, 24)
    assert (info.codec, info.pix_fmt) == ("h264", "yuv420p")
    data = path.read_bytes()
    assert data.index(b"moov") < data.index(b"mdat"), "+faststart puts the index first"


@pytest.mark.parametrize("shape", [(9, 33, 32, 3), (9, 32, 31, 3)])
def test_odd_sizes_are_refused(tmp_path, shape) -> None:
    with pytest.raises(ValueError, match="even width and height"):
        encode_mp4(np.zeros(shape, np.uint8), 8, tmp_path / "v.mp4")


def test_wrong_dtype_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="uint8"):
        encode_mp4(np.zeros((9, 32, 32, 3), np.float32), 8, tmp_path / "v.mp4")


def test_an_input_that_is_no_image_is_named_so() -> None:
    """The job's error message says what is wrong, not the repr (an address) of a buffer."""
    import io

    from PIL import Image

    from worker.inputs import load_image

    with pytest.raises(ValueError, match=r"^not an image file$"):
        load_image(b"GIF89a, or so it says", 32, 32)
    png = io.BytesIO()
    Image.new("RGB", (40, 20), "red").save(png, "PNG")
    assert load_image(png.getvalue(), 32, 32).size == (32, 32)
