"""The ``streamhydro`` command. Runs on the driver machine.

Each subcommand lives in its own module, which exposes ``add_parser(subparsers)``; the parser it
adds sets ``run`` (a function taking the parsed arguments and returning an exit code). Modules are
imported when the parser is built, so they keep heavy imports (pyspark, torch) inside ``run``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from streamhydro import __version__
from streamhydro.errors import StreamhydroError
from streamhydro.secrets import install_log_filter, redact

COMMANDS = (
    "streamhydro.driver.serve",
    "streamhydro.driver.demo",
    "streamhydro.producer",
    "streamhydro.trainer.command",
    "streamhydro.models_command",
    "streamhydro.metrics.exporter",
    "streamhydro.jars",
)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamhydro",
        description="Streaming inference on Apache Spark: Kafka -> Structured Streaming -> Arrow -> ONNX Runtime -> Kafka.",
    )
    parser.add_argument("--version", action="version", version=f"streamhydro {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log verbosity (default INFO)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        importlib.import_module(module).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format=LOG_FORMAT, stream=sys.stderr)
    install_log_filter()
    # py4j logs every gateway call at INFO; it drowns ours.
    logging.getLogger("py4j").setLevel(logging.WARNING)
    try:
        return args.run(args)
    except StreamhydroError as exc:
        print(f"streamhydro: error: {redact(str(exc))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
