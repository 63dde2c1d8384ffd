"""`videogen-gateway`: run the HTTP/WebSocket gateway."""

from __future__ import annotations

import sys

import structlog
from aiohttp import web

from common.logs import configure_logging
from common.settings import GatewaySettings, arguments_or_exit, settings_or_exit
from common.topology import BrokerUnreachable
from gateway.app import ConfigError, create_app

log = structlog.get_logger("gateway")


def main() -> None:
    arguments_or_exit(GatewaySettings, "videogen-gateway", sys.argv[1:])
    settings = settings_or_exit(GatewaySettings, "videogen-gateway")
    configure_logging(settings.log_level, settings.log_format)
    try:
        app = create_app(settings)
    except ConfigError as exc:
        print(f"videogen-gateway: {exc}", file=sys.stderr)
        sys.exit(2)

    def serving(_banner: str) -> None:  # called once the port is bound
        log.info(
            "gateway_started", host=settings.host, port=settings.port, webhooks=settings.webhook_secret is not None
        )

    try:
        web.run_app(app, host=settings.host, port=settings.port, print=serving, access_log=None, shutdown_timeout=10.0)
    except BrokerUnreachable as exc:
        print(f"videogen-gateway: {exc}", file=sys.stderr)
        sys.exit(1)
    except OSError as exc:  # the port is taken, or the host is not this machine's
        print(
            f"videogen-gateway: cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
