"""The console of ``serve``, ``demo`` and ``train``: streamhydro's own lines there, everyone else's in a log file.

Runs on the driver, once per command, before Spark starts. The JVM that PySpark launches, the Python
workers Spark forks, librdkafka and other native libraries write straight to the process's file
descriptors 1 and 2, which they inherit; no logging setting of ours reaches them. :func:`divert`
therefore points descriptors 1 and 2 at the log file and gives Python's ``sys.stdout`` and
``sys.stderr`` the original terminal (or pipe) back. What streamhydro prints (progress, JSON summaries,
one-line errors) and logs (its own loggers) still reaches the console; Spark's log4j output (banner,
progress bars, warnings), Kafka client chatter and third-party Python loggers and warnings land in the
file, which every command names once. ``streamhydro --verbose COMMAND`` leaves both descriptors alone.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

# Loggers whose INFO lines are the user's console; every other logger reaches the console from ERROR on.
OWN_LOGGER = "streamhydro"


def divert(path: Path) -> Path:
    """Send file descriptors 1 and 2 (and so every child process) to ``path``; keep Python's streams on the console."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    console_out, console_err = os.dup(1), os.dup(2)
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    try:
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
    finally:
        os.close(log_fd)
    sys.stdout = open(console_out, "w", buffering=1, encoding="utf-8", errors="backslashreplace")  # noqa: SIM115 -- lives as long as the process
    sys.stderr = open(console_err, "w", buffering=1, encoding="utf-8", errors="backslashreplace")  # noqa: SIM115
    return path


class _ConsoleFilter(logging.Filter):
    """streamhydro's own records at the configured level; other loggers' only from ERROR on."""

    def filter(self, record: logging.LogRecord) -> bool:
        own = record.name == OWN_LOGGER or record.name.startswith(OWN_LOGGER + ".")
        return own or record.levelno >= logging.ERROR


def configure_logging(level: str, fmt: str, log_file: Path | None) -> None:
    """Console logging on ``sys.stderr``; with a diverted ``log_file``, every record also goes to that file."""
    root = logging.getLogger()
    root.setLevel(level)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(fmt))
    root.addHandler(console)
    if log_file is None:
        return
    console.addFilter(_ConsoleFilter())
    to_file = logging.FileHandler(log_file, encoding="utf-8")
    to_file.setFormatter(logging.Formatter(fmt))
    root.addHandler(to_file)
    # Python warnings (pyspark's, pandas') are library chatter too.
    logging.captureWarnings(True)
