"""The per-node metrics exporter for cluster mode. Runs on every worker node, beside the executors.

On a cluster the executors' Python workers write their metric files on their own node, in the
directory named by ``metrics.multiprocess_dir`` (an absolute path, the same on every node); this
process merges that directory's files and serves them, with the node's GPU metrics, on one port
that Prometheus scrapes. Deployment (systemd unit, Kubernetes sidecar sharing an ``emptyDir`` with
the executor pod) is described in docs/metrics.md.

    streamhydro metrics-exporter --dir /var/lib/streamhydro/metrics --host 0.0.0.0 --port 9109
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from streamhydro.metrics import multiprocess
from streamhydro.metrics.endpoint import Endpoint
from streamhydro.metrics.gpu import GpuCollector

log = logging.getLogger(__name__)

DEFAULT_PORT = 9109


class NodeExporter:
    """Serves one node's multiprocess directory and GPUs until :meth:`close`."""

    def __init__(self, directory: Path, host: str, port: int, certfile: str = "", keyfile: str = "", clean: bool = False) -> None:
        directory = directory.resolve()
        if clean:
            multiprocess.clean(directory)
        else:
            directory.mkdir(parents=True, exist_ok=True)
        self.registry = CollectorRegistry()
        MultiProcessCollector(self.registry, path=str(directory))
        self._gpu = GpuCollector()
        self.registry.register(self._gpu)
        self._endpoint = Endpoint(self.registry, host, port, certfile, keyfile)
        self.url = self._endpoint.url

    def close(self) -> None:
        self._endpoint.close()
        self._gpu.close()


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "metrics-exporter",
        help="serve a worker node's executor metrics (cluster mode)",
        description="Merge the metric files the executors' Python workers write into metrics.multiprocess_dir "
        "on this node, and serve them with this node's GPU metrics. Stops on SIGTERM/SIGINT.",
    )
    _arguments(parser)
    parser.set_defaults(run=run)


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", required=True, type=Path, help="the executors' metrics.multiprocess_dir on this node")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for remote scrapes)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to bind (default {DEFAULT_PORT}; 0 = any free)")
    parser.add_argument("--certfile", default="", help="TLS certificate (with --keyfile)")
    parser.add_argument("--keyfile", default="", help="TLS private key")
    parser.add_argument("--clean", action="store_true", help="delete metric files of earlier runs at start")


def run(args: argparse.Namespace) -> int:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    exporter = NodeExporter(args.dir, args.host, args.port, args.certfile, args.keyfile, args.clean)
    print(f"metrics at {exporter.url}", flush=True)
    try:
        stop.wait()
    finally:
        exporter.close()
    return 0
