"""``streamhydro serve`` start -> first prediction, as users start it, with where the time goes.

    python benchmarks/cold_start.py [--repeats 3] [--sources python,builtin]

One Apache Kafka broker; 1,000 events wait in the input topic. For each connector, ``--repeats`` times,
``python -m streamhydro serve --config FILE`` starts as a new process with a new checkpoint, and a reader
on the output topic takes the time the first prediction arrives. serve's log lines mark the milestones
(times from process start): ``session`` (Spark session up: JVM, SparkContext), ``model`` (the model
loaded and checked), ``warm_up`` (Python workers started and the model session made), ``query`` (the
streaming query started); ``first_prediction`` is the reader's. Prints one JSON object (last line) with
every run and the median of each milestone per connector.
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
from pathlib import Path
from typing import Any

from streamhydro.brokers import ApacheKafkaBroker
from streamhydro.kafka.admin import ensure_topics
from streamhydro.kafka.options import client_for
from streamhydro.outputs import OutputReader
from streamhydro.producer import LoadGenerator
from streamhydro.registry import Registry

REPO = Path(__file__).parent.parent
EVENTS = 1000
DEADLINE_S = 180.0
# serve's log line that marks each milestone (the first line containing the text).
MILESTONES = {
    "session": "scoring stage (Kafka read, score, Kafka write)",
    "model": "serving model",
    "warm_up": "warm-up:",
    "query": "query started",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sources", default="python,builtin")
    args = parser.parse_args()
    environment = {**os.environ, "PYTHONPATH": str(REPO), "SPARK_LOCAL_IP": os.environ.get("SPARK_LOCAL_IP", "127.0.0.1")}
    model = Registry(REPO / "models").get("breast_cancer", "promoted")
    runs: dict[str, list[dict[str, float]]] = {}
    with ApacheKafkaBroker() as broker, tempfile.TemporaryDirectory(prefix="streamhydro-cold-") as work:
        bootstrap = broker.bootstrap_servers
        ensure_topics(client_for(bootstrap), {"events": 2})
        LoadGenerator(client_for(bootstrap), "events", model.manifest).run(EVENTS, None, threading.Event())
        for source in args.sources.split(","):
            runs[source] = [one_run(bootstrap, source, Path(work) / f"{source}-{i}", environment) for i in range(args.repeats)]
    result: dict[str, Any] = {"cpus": os.cpu_count(), "runs": runs}
    for source, rows in runs.items():
        result[f"{source}_median_s"] = {key: round(statistics.median(row[key] for row in rows), 2) for key in rows[0]}
        print(f"{source:>8}  {result[f'{source}_median_s']}", file=sys.stderr)
    print(json.dumps(result))


def one_run(bootstrap: str, source: str, work: Path, environment: dict[str, str]) -> dict[str, float]:
    work.mkdir(parents=True)
    output = f"out-{work.name}"
    ensure_topics(client_for(bootstrap), {output: 2, f"{output}-dlq": 1})
    config = work / "serve.toml"
    config.write_text(
        f'[spark]\nmaster = "local[2]"\ncheckpoint_location = "{work}/checkpoint"\nconf = {{ "spark.ui.enabled" = "false" }}\n\n'
        f'[kafka]\nbootstrap_servers = "{bootstrap}"\nsubscribe = "events"\noutput_topic = "{output}"\n'
        f'dead_letter_topic = "{output}-dlq"\nsource = "{source}"\n\n'
        f'[model]\nregistry = "{REPO / "models"}"\n\n[metrics]\nenabled = false\n'
    )
    reader = OutputReader(client_for(bootstrap), (output,))
    reader.start()
    marks: dict[str, float] = {}
    started = time.monotonic()
    serve = subprocess.Popen(
        [sys.executable, "-m", "streamhydro", "serve", "--config", str(config)],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=environment, cwd=REPO,
    )
    watcher = threading.Thread(target=_watch_log, args=(serve, started, marks), daemon=True)
    watcher.start()
    try:
        while reader.first_at is None:
            if time.monotonic() - started > DEADLINE_S or serve.poll() is not None:
                raise SystemExit(f"{source}: no prediction within {DEADLINE_S} s (serve exit code {serve.poll()})")
            time.sleep(0.02)
    finally:
        serve.terminate()
        serve.wait(timeout=120)
        reader.stop()
    watcher.join(timeout=10)
    return {**{name: round(marks[name], 2) for name in MILESTONES if name in marks}, "first_prediction": round(reader.first_at - started, 2)}


def _watch_log(serve: subprocess.Popen, started: float, marks: dict[str, float]) -> None:
    for line in serve.stderr:
        for name, text in MILESTONES.items():
            if name not in marks and text in line:
                marks[name] = time.monotonic() - started


if __name__ == "__main__":
    main()
