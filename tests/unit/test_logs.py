"""The processes' log lines: errors without object addresses, console lines without colour in a file."""

from __future__ import annotations

import subprocess
import sys

from common.logs import plain_errors


def test_an_errors_object_reprs_become_class_names() -> None:
    event = {"error": "<aio_pika.robust_channel.RobustChannel object at 0x7f3c1a2b9d50> closed", "job_id": "j"}
    assert plain_errors(None, "error", event) == {"error": "RobustChannel closed", "job_id": "j"}
    assert plain_errors(None, "error", {"error": "connection refused"}) == {"error": "connection refused"}
    aiormq = {"error": '<Channel: "4" at 0x7f919d5934d0> closed'}  # aiormq's own repr
    assert plain_errors(None, "error", aiormq) == {"error": "Channel closed"}


def test_console_lines_written_to_a_file_carry_no_colour_codes(tmp_path) -> None:
    code = (
        "from common.logs import configure_logging; import structlog; "
        "configure_logging('INFO', 'console'); "
        "structlog.get_logger('t').warning('something_happened', error='<x.Y object at 0xabc> closed')"
    )
    path = tmp_path / "log"
    with path.open("w") as log:
        subprocess.run([sys.executable, "-c", code], stderr=log, check=True, timeout=60)
    text = path.read_text()
    assert "something_happened" in text and "error=Y closed" in text.replace("'", ""), text
    assert "\x1b[" not in text, text
