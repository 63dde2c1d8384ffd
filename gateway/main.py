"""`videogen-gateway`: run the HTTP/WebSocket gateway."""

from __future__ import annotations

import sys

from aiohttp import web

from common.logs import configure_logging
from common.settings import GatewaySettings, settings_or_exit
from gateway.app import ConfigError, create_app


def main() -> None:
    settings = settings_or_exit(GatewaySettings, "videogen-gateway")
    configure_logging(settings.log_level, settings.log_format)
    try:
        app = create_app(settings)
    except ConfigError as exc:
        print(f"videogen-gateway: {exc}", file=sys.stderr)
        sys.exit(2)
    web.run_app(app, host=settings.host, port=settings.port, print=None, access_log=None, shutdown_timeout=10.0)


if __name__ == "__main__":
    main()
