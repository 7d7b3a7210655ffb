"""Where a micro-batch's time goes, at low and high input rates, for each connector of ``serve``.

    python benchmarks/breakdown.py [--rates 1000,5000] [--seconds 30] [--burst 400000]
    python benchmarks/plot_breakdown.py docs/measurements/breakdown.json docs/performance-breakdown.png

One Apache Kafka broker; for each connector (``python``: each task reads, scores and writes its range;
``builtin``: Spark's JVM source and sink around ``mapInArrow``) a fresh ``serve`` (its own process, the
demo model, two input partitions, ``local[2]``, metrics on) runs through phases:

- ``live_<rate>``: events produced at ``<rate>``/s for ``--seconds`` (``linger.ms=1``) while the query runs;
- ``burst``: ``--burst`` events produced as fast as one producer can while the query runs.

Per phase, from two sources:

- the driver: every micro-batch's ``durationMs`` from Structured Streaming's progress (offset planning
  ``latestOffset``, write-ahead log ``walCommit``, ``queryPlanning``, the Spark job ``addBatch``,
  ``commitOffsets``), and the gap from a batch's end to the next one's start;
- the executors: the engine's stage histograms (``streamhydro_inference_stage_duration_seconds``: read,
  decode, compute, encode, write; ``streamhydro_delivery_wait_seconds``), scraped from the service's
  Prometheus endpoint at the start and end of the phase, as means per task.

``job_and_handoff_ms`` is ``addBatch`` less the mean task: scheduling the job, starting its tasks, moving
their rows between the JVM and Python workers. Prints one JSON object (last line) with every phase of
every connector, each phase's produce->prediction latency (p50/p99, from a reader that takes the time as
each record arrives) and its events per micro-batch. The driver phases are means over the micro-batches
that read events.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from end_to_end import wait_until

from streamhydro.brokers import ApacheKafkaBroker
from streamhydro.config import Config
from streamhydro.driver.demo import latency_summary
from streamhydro.driver.serve import Service
from streamhydro.kafka.admin import ensure_topics
from streamhydro.kafka.options import Connector, client_for
from streamhydro.metrics.listener import records_read
from streamhydro.outputs import OutputReader
from streamhydro.producer import LoadGenerator
from streamhydro.registry import Registry

PARTITIONS = 2
CONNECTORS = (Connector.PYTHON, Connector.BUILTIN)
DRIVER_PHASES = ("latestOffset", "walCommit", "queryPlanning", "getBatch", "addBatch", "commitOffsets")
TASK_STAGES = ("read", "decode", "h2d", "compute", "d2h", "encode", "write")
DEADLINE_S = 300.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="1000,5000", help="live rates, events/s, comma-separated")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each live phase")
    parser.add_argument("--burst", type=int, default=400_000, help="events of the burst phase")
    parser.add_argument("--registry", default="models")
    parser.add_argument("--model", default="breast_cancer")
    parser.add_argument("--one", metavar="CONNECTOR", help=argparse.SUPPRESS)
    parser.add_argument("--bootstrap", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    if args.one:
        print(json.dumps(run_connector(Connector(args.one), args.bootstrap, args)))
        return
    result: dict[str, Any] = {"cpus": os.cpu_count(), "rates": args.rates, "seconds": args.seconds, "burst": args.burst}
    with ApacheKafkaBroker() as broker:
        for connector in CONNECTORS:
            child = subprocess.run(
                [sys.executable, __file__, *sys.argv[1:], "--one", connector, "--bootstrap", broker.bootstrap_servers],
                stdout=subprocess.PIPE, check=True, timeout=DEADLINE_S * 6, text=True,
            )
            result[connector] = json.loads(child.stdout.strip().splitlines()[-1])
    for connector in CONNECTORS:
        for phase, row in result[connector].items():
            print(f"{connector:>8} {phase:>10}  {row}", file=sys.stderr)
    print(json.dumps(result))


def run_connector(connector: Connector, bootstrap: str, args: argparse.Namespace) -> dict[str, Any]:
    """Start serve with ``connector`` and run every phase through it (in this process)."""
    model = Registry(args.registry).get(args.model, "promoted")
    source, output = f"breakdown-{connector}", f"breakdown-{connector}-out"
    ensure_topics(client_for(bootstrap), {source: PARTITIONS, output: PARTITIONS, f"{output}-dlq": 1})
    with tempfile.TemporaryDirectory(prefix="streamhydro-breakdown-") as work:
        config = Config().replace(
            spark={"master": "local[2]", "app_name": f"breakdown-{connector}", "checkpoint_location": f"{work}/checkpoint",
                   "conf": {"spark.ui.enabled": "false", "spark.sql.streaming.numRecentProgressUpdates": "100000"}},
            kafka={"bootstrap_servers": bootstrap, "subscribe": source, "output_topic": output,
                   "dead_letter_topic": f"{output}-dlq", "source": connector},
            model={"registry": args.registry, "name": args.model},
            inference={"providers": ["CPUExecutionProvider"], "pipeline_depth": 0},
            metrics={"port": 0, "multiprocess_dir": f"{work}/metrics"},
        )
        service = Service(config)
        service.start()
        reader = OutputReader(client_for(bootstrap), (output,), track=True, group=f"breakdown-{connector}")
        reader.start()
        phases: dict[str, Any] = {}
        try:
            warm_up = LoadGenerator(client_for(bootstrap), source, model.manifest, seed=1)
            warm_up.run(200, None, threading.Event())
            warm_up.close()
            wait_until(lambda: reader.distinct >= 200, DEADLINE_S, "warm-up predictions")
            for rate in (float(r) for r in args.rates.split(",")):
                count = int(rate * args.seconds)
                phases[f"live_{rate:g}"] = phase(service, reader, bootstrap, source, model.manifest, count, rate)
            phases["burst"] = phase(service, reader, bootstrap, source, model.manifest, args.burst, None)
        finally:
            reader.stop()
            service.stop()
    return phases


def phase(service: Service, reader: OutputReader, bootstrap: str, source: str, manifest, count: int, rate: float | None) -> dict[str, Any]:
    """Produce ``count`` events at ``rate`` (None: as fast as possible); the breakdown of the micro-batches meanwhile."""
    url = service.metrics.url
    before_metrics, before_batch, seen = _scrape(url), _last_batch(service.query), reader.distinct
    producer = LoadGenerator(client_for(bootstrap, {"linger.ms": "1"} if rate else None), source, manifest, seed=int(time.time()))
    started = time.monotonic()
    producer.run(count, rate, threading.Event())
    producer.close()
    wait_until(lambda: reader.distinct >= seen + count, DEADLINE_S, f"{count} predictions")
    elapsed = time.monotonic() - started
    progress = [p for p in service.query.recentProgress if p["batchId"] > before_batch]
    return {
        "events": count,
        "seconds": round(elapsed, 2),
        **driver_breakdown(progress),
        **task_breakdown(before_metrics, _scrape(url)),
        **latency_summary(reader.latency_ms(since=seen)),
    }


def driver_breakdown(progress: list[Any]) -> dict[str, Any]:
    """Means over the micro-batches that read events: their size, ``durationMs`` phases and the gap before the next."""
    batches = [p for p in progress if records_read(p) > 0]
    if not batches:
        return {"micro_batches": 0}
    ends = {p["batchId"]: _millis(p["timestamp"]) + p["durationMs"].get("triggerExecution", 0) for p in progress}
    starts = {p["batchId"]: _millis(p["timestamp"]) for p in progress}
    gaps = [starts[b + 1] - ends[b] for b in ends if b + 1 in starts]
    means = {f"{name}_ms": round(float(np.mean([p["durationMs"].get(name, 0) for p in batches])), 1) for name in DRIVER_PHASES}
    trigger = float(np.mean([p["durationMs"].get("triggerExecution", 0) for p in batches]))
    return {
        "micro_batches": len(batches),
        "events_per_batch": round(float(np.mean([records_read(p) for p in batches])), 1),
        "trigger_ms": round(trigger, 1),
        **means,
        "driver_other_ms": round(trigger - sum(means.values()), 1),
        "gap_ms": round(float(np.mean(gaps)), 1) if gaps else None,
    }


def task_breakdown(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """Per task, means of the engine's stages, its wall time and the delivery wait, between two scrapes."""
    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    tasks = delta("streamhydro_inference_partition_duration_seconds_count")
    if not tasks:
        return {"tasks": 0}
    stages = {f"{stage}_ms": round(1000 * delta(f"streamhydro_inference_stage_duration_seconds_sum|{stage}") / tasks, 2) for stage in TASK_STAGES}
    wall = 1000 * delta("streamhydro_inference_partition_duration_seconds_sum") / tasks
    waits = delta("streamhydro_delivery_wait_seconds_count")
    wait = 1000 * delta("streamhydro_delivery_wait_seconds_sum") / waits if waits else 0.0
    return {
        "tasks": int(tasks),
        **stages,
        "task_other_ms": round(wall - sum(stages.values()), 2),
        "delivery_wait_ms": round(wait, 2),
        "task_ms": round(wall + wait, 2),
    }


def _scrape(url: str) -> dict[str, float]:
    """The sums and counts this benchmark reads from the Prometheus endpoint (stage sums keyed ``name|stage``)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.endswith(("_sum", "_count")):
                continue
            key = f"{sample.name}|{sample.labels['stage']}" if "stage" in sample.labels else sample.name
            values[key] = values.get(key, 0.0) + sample.value
    return values


def _last_batch(query) -> int:
    progress = query.lastProgress
    return progress["batchId"] if progress else -1


def _millis(timestamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp() * 1000


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent.parent))
    main()
