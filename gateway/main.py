"""`videogen-gateway`: run the HTTP/WebSocket gateway."""

from __future__ import annotations

from aiohttp import web

from common.logs import configure_logging
from common.settings import GatewaySettings
from gateway.app import create_app


def main() -> None:
    settings = GatewaySettings()
    configure_logging(settings.log_level, settings.log_format)
    web.run_app(
        create_app(settings), host=settings.host, port=settings.port, print=None, access_log=None, shutdown_timeout=10.0
    )


if __name__ == "__main__":
    main()
