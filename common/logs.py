"""structlog set-up: JSON lines when not on a terminal, key=value on a terminal."""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

import structlog

# An object's repr with its address, as some libraries' errors print it ("<aio_pika.robust_channel.RobustChannel
# object at 0x7f...> closed", aiormq's "<Channel: "4" at 0x7f...> closed"): the class name says as
# much, and the address nothing.
_OBJECT_REPR = re.compile(r"<(?:[\w.]+\.)?(\w+)(?: object|:[^<>]*?) at 0x[0-9a-fA-F]+>")


def plain_errors(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    """A log line's `error` with objects' default reprs shortened to their class names."""
    error = event.get("error")
    if isinstance(error, str) and " at 0x" in error:
        event["error"] = _OBJECT_REPR.sub(r"\1", error)
    return event


def configure_logging(level: str = "INFO", fmt: str = "auto") -> None:
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())  # no colour codes in a file
    )
    logging.basicConfig(level=level.upper(), stream=sys.stderr, format="%(message)s")
    # Libraries log through stdlib; keep their chatter at WARNING.
    for noisy in ("aio_pika", "aiormq", "urllib3", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            plain_errors,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
