"""``python -m mesh_gateway``: the only place that reads the environment."""

import os

from mesh_common.logs import configure_logging
from mesh_common.serve import bind_socket, run

from .app import create_app
from .settings import Settings

# Envoy finds gateways through Consul's DNS and asks again every second
# (dns_refresh_rate in envoy/): a leaving gateway keeps its listener open
# longer than that, so that Envoy has dropped it before connections are refused.
DRAIN_SECONDS = 1.5


def main() -> None:
    settings = Settings.from_env(os.environ)
    configure_logging(settings.service.log_format)
    sock = bind_socket(settings.service.host, settings.service.port)
    settings = settings.with_port(sock.getsockname()[1])
    run(create_app(settings), sock, drain_seconds=DRAIN_SECONDS)


if __name__ == "__main__":
    main()
