"""The HTTP(S) endpoint Prometheus scrapes. Runs wherever metrics are served: the driver (serve, demo),
the per-node exporter, a trainer rank that has no Pushgateway.

A thin wrapper over prometheus_client's WSGI server (a daemon thread) that knows its real port
(``port=0`` binds any free one), its URL, and how to stop. TLS is prometheus_client's: a
certificate and key file, loaded once at start.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, start_http_server

from streamhydro.errors import ConfigError

log = logging.getLogger(__name__)


class Endpoint:
    """A running metrics endpoint; :meth:`close` stops it and joins its thread."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int, certfile: str = "", keyfile: str = "") -> None:
        if bool(certfile) != bool(keyfile):
            raise ConfigError("metrics.keyfile", "TLS needs both a certificate and a key file", "set both, or neither")
        try:
            self._server, self._thread = start_http_server(
                port, addr=host, registry=registry, certfile=certfile or None, keyfile=keyfile or None
            )
        except OSError as exc:
            raise ConfigError("metrics.port", f"cannot listen on {host}:{port} ({exc})", "pick a free port, or 0 for any") from exc
        self.port: int = self._server.server_port
        scheme = "https" if certfile else "http"
        shown = f"[{host}]" if ":" in host else host
        self.url = f"{scheme}://{shown}:{self.port}/metrics"
        log.debug("metrics endpoint listening at %s", self.url)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
