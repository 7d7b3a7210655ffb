"""``streamhydro serve`` start -> first prediction, as users start it, with where the time goes.

    python benchmarks/cold_start.py [--repeats 3] [--sources python,builtin] [--fresh-venv]   # from the repository root

One Apache Kafka broker; 1,000 events wait in the input topic. For each connector, ``--repeats`` times,
``streamhydro serve --config FILE`` starts as a new process with the README's minimal config (every other
key at its default; :func:`streamhydro.harness.supervisor.write_minimal_config`) and a new checkpoint, and
a reader on the output topic takes the time the first prediction arrives.

With ``--fresh-venv`` serve runs from a virtualenv made for this run the way ``deploy/bootstrap.sh demo``
makes one (``python -m venv``, ``pip install -e .[cpu]``, ``streamhydro jars --without-registry``, which
builds the driver JVM's class archive, :mod:`streamhydro.classes`; pip's and the jar cache are used as they
are); its first run is
the first start after install (Python has compiled nothing of what it imports yet beyond what pip
compiled). The OS file cache is not dropped (that needs root on the host).

Milestones, in seconds from the process start, from the timestamps of serve's log lines: ``python``
(Python up, serve's modules imported and its config read), ``session`` (Spark session up: JVM, SparkContext), ``model`` (the model loaded and checked), ``query`` (the streaming
query started), ``warm_up`` (the warm-up job done: Python workers started and the model session made;
absent when serve was stopped before it logged); ``first_prediction`` is the reader's. Prints one JSON
object (last line) with every run, the first run (``first_run``: with ``--fresh-venv`` the first start
after install) and the median of each milestone per connector.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from streamhydro.brokers import ApacheKafkaBroker
from streamhydro.kafka.admin import ensure_topics
from streamhydro.kafka.options import client_for
from streamhydro.outputs import OutputReader
from streamhydro.producer import LoadGenerator
from streamhydro.registry import Registry
from streamhydro.harness.supervisor import ServeProcess, write_minimal_config

ROOT = Path(__file__).resolve().parent.parent
EVENTS = 1000
DEADLINE_S = 180.0
# serve's log line that marks each milestone (the first line containing the text).
MILESTONES = {
    "python": "starting the Spark session",
    "session": "scoring stage (Kafka read, score, Kafka write)",
    "model": "serving model",
    "query": "query started",
    "warm_up": "warm-up:",
}
# serve's log lines start with the local time, as logging's default asctime writes it.
LOG_TIME = "%Y-%m-%d %H:%M:%S,%f"
LOG_TIME_CHARS = 23


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sources", default="python,builtin")
    parser.add_argument("--fresh-venv", action="store_true", help="run serve from a virtualenv made for this run (its first run: the first start after install)")
    parser.add_argument("--registry", default="models")
    parser.add_argument("--model", default="breast_cancer")
    args = parser.parse_args()
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    model = Registry(args.registry).get(args.model, "promoted")
    runs: dict[str, list[dict[str, float]]] = {}
    result: dict[str, Any] = {"cpus": os.cpu_count(), "events_waiting": EVENTS, "config": "minimal (defaults)"}
    with ApacheKafkaBroker() as broker, tempfile.TemporaryDirectory(prefix="streamhydro-cold-") as work:
        python = None
        if args.fresh_venv:
            python, result["venv_install_s"] = fresh_venv(Path(work) / "venv")
        result["python"] = python or sys.executable
        bootstrap = broker.bootstrap_servers
        ensure_topics(client_for(bootstrap), {"events": 2})
        LoadGenerator(client_for(bootstrap), "events", model.manifest).run(EVENTS, None, threading.Event())
        for source in args.sources.split(","):
            runs[source] = [
                one_run(bootstrap, source, Path(work) / f"{source}-{i}", Path(args.registry) / args.model, python) for i in range(args.repeats)
            ]
            print(f"{source:>8}  {runs[source]}", file=sys.stderr, flush=True)
        if python is not None:  # the fresh virtualenv's class archive (~160 MB) goes with it
            archive = subprocess.run([python, "-c", "from streamhydro.classes import archive_path; print(archive_path())"], capture_output=True, text=True, check=True)
            Path(archive.stdout.strip()).unlink(missing_ok=True)
    result["runs"] = runs
    for source, rows in runs.items():
        keys = [key for key in (*MILESTONES, "first_prediction") if any(key in row for row in rows)]
        result[f"{source}_median_s"] = {key: round(statistics.median(row[key] for row in rows if key in row), 2) for key in keys}
        print(f"{source:>8}  median {result[f'{source}_median_s']}", file=sys.stderr)
    first = args.sources.split(",")[0]
    result["first_run"] = {"source": first, **runs[first][0]}
    print(json.dumps(result))


def fresh_venv(path: Path) -> tuple[str, float]:
    """A virtualenv at ``path`` with streamhydro installed as ``deploy/bootstrap.sh demo`` installs it (and its
    class archive built); its python and the seconds the install took."""
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    subprocess.run([str(path / "bin" / "pip"), "install", "-q", "-e", f"{ROOT}[cpu]"], check=True)
    subprocess.run([str(path / "bin" / "streamhydro"), "--log-level", "WARNING", "jars", "--without-registry"], check=True, stdout=subprocess.DEVNULL)
    return str(path / "bin" / "python"), round(time.monotonic() - started, 1)


def one_run(bootstrap: str, source: str, work: Path, model: Path, python: str | None) -> dict[str, float]:
    work.mkdir(parents=True)
    output = f"out-{work.name}"
    ensure_topics(client_for(bootstrap), {output: 2, f"{output}-dlq": 1})
    config = write_minimal_config(work / "serve.toml", work, bootstrap, "events", output, model, {"kafka": {"source": source}})
    serve = ServeProcess(config, work / "serve.log", python)
    reader = OutputReader(client_for(bootstrap), (output,))
    reader.start()
    started_wall, started = time.time(), time.monotonic()
    serve.start()
    try:
        while reader.first_at is None:
            if time.monotonic() - started > DEADLINE_S or serve.poll() is not None:
                raise SystemExit(f"{source}: no prediction within {DEADLINE_S} s (serve exit code {serve.poll()}, log {serve.log_path})")
            time.sleep(0.02)
    finally:
        if serve.terminate(timeout_s=120) is None:
            serve.kill()
        reader.stop()
    return {**milestones(serve.log_path, started_wall), "first_prediction": round(reader.first_at - started, 2)}


def milestones(log_path: Path, started: float) -> dict[str, float]:
    """Seconds from ``started`` (wall clock) to the first log line of each milestone, from the lines' timestamps."""
    marks: dict[str, float] = {}
    for line in log_path.read_text(errors="replace").splitlines():
        for name, text in MILESTONES.items():
            if name not in marks and text in line:
                logged = datetime.strptime(line[:LOG_TIME_CHARS], LOG_TIME).timestamp()
                marks[name] = round(logged - started, 2)
    return marks


if __name__ == "__main__":
    main()
