"""The ``streamhydro`` command. Runs on the driver machine.

Each subcommand lives in its own module, which exposes ``add_parser(subparsers)``; the parser it
adds sets ``run`` (a function taking the parsed arguments and returning an exit code). Modules are
imported when the parser is built, so they keep heavy imports (pyspark, torch) inside ``run``. A
subcommand that starts Spark also sets ``third_party_log`` (a file name): its console then shows only
streamhydro's own output, and Spark's, Kafka's and the libraries' go to that file (:mod:`streamhydro.console`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from pathlib import Path

from streamhydro import __version__
from streamhydro.console import configure_logging, divert
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
    parser.add_argument(
        "--verbose", action="store_true",
        help="print Spark's, Kafka's and the libraries' output here too, instead of only into the log file",
    )
    parser.add_argument("--log-dir", default="var/log", help="where serve, demo and train keep that log file (default %(default)s)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        importlib.import_module(module).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log_file = None
    if getattr(args, "third_party_log", None) and not args.verbose:
        log_file = divert(Path(args.log_dir) / args.third_party_log)
    configure_logging(args.log_level, LOG_FORMAT, log_file)
    install_log_filter()
    if log_file is not None:
        print(f"Spark, Kafka and library logs: {log_file} (--verbose shows them here)", file=sys.stderr, flush=True)
    # py4j logs every gateway call at INFO; it drowns ours.
    logging.getLogger("py4j").setLevel(logging.WARNING)
    try:
        return args.run(args)
    except StreamhydroError as exc:
        print(f"streamhydro: error: {redact(str(exc))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
