"""``streamhydro serve`` start -> first prediction, as users start it, with where the time goes.

    python benchmarks/cold_start.py [--repeats 3] [--sources python,builtin]     # from the repository root

One Apache Kafka broker; 1,000 events wait in the input topic. For each connector, ``--repeats`` times,
``streamhydro serve --config FILE`` starts as a new process (:class:`streamhydro.harness.supervisor.ServeProcess`,
the benchmarks' serve config with a new checkpoint), and a reader on the output topic takes the time the
first prediction arrives. The timestamps of serve's log lines mark the milestones (from process start):
``session`` (Spark session up: JVM, SparkContext), ``model`` (the model loaded and checked), ``query`` (the
streaming query started), ``warm_up`` (the warm-up job, which runs while the query starts, done: Python
workers started and the model session made; absent when serve was stopped before it logged);
``first_prediction`` is the reader's. Prints one JSON object (last line) with every run and the median of
each milestone per connector.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
from streamhydro.harness.supervisor import ServeProcess, write_serve_config

EVENTS = 1000
DEADLINE_S = 180.0
# serve's log line that marks each milestone (the first line containing the text).
MILESTONES = {
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
    args = parser.parse_args()
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    model = Registry("models").get("breast_cancer", "promoted")
    runs: dict[str, list[dict[str, float]]] = {}
    with ApacheKafkaBroker() as broker, tempfile.TemporaryDirectory(prefix="streamhydro-cold-") as work:
        bootstrap = broker.bootstrap_servers
        ensure_topics(client_for(bootstrap), {"events": 2})
        LoadGenerator(client_for(bootstrap), "events", model.manifest).run(EVENTS, None, threading.Event())
        for source in args.sources.split(","):
            runs[source] = [one_run(bootstrap, source, Path(work) / f"{source}-{i}") for i in range(args.repeats)]
    result: dict[str, Any] = {"cpus": os.cpu_count(), "runs": runs}
    for source, rows in runs.items():
        keys = [key for key in (*MILESTONES, "first_prediction") if any(key in row for row in rows)]
        result[f"{source}_median_s"] = {key: round(statistics.median(row[key] for row in rows if key in row), 2) for key in keys}
        print(f"{source:>8}  {result[f'{source}_median_s']}", file=sys.stderr)
    print(json.dumps(result))


def one_run(bootstrap: str, source: str, work: Path) -> dict[str, float]:
    work.mkdir(parents=True)
    output = f"out-{work.name}"
    ensure_topics(client_for(bootstrap), {output: 2, f"{output}-dlq": 1})
    kafka = {"output_topic": output, "dead_letter_topic": f"{output}-dlq", "source": source}
    serve = ServeProcess(write_serve_config(work / "serve.toml", work, bootstrap, kafka), work / "serve.log")
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
