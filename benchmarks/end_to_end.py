"""End-to-end throughput and latency of ``streamhydro serve`` on the embedded broker.

    python benchmarks/end_to_end.py [--events 200000] [--latency-rate 5000] [--latency-seconds 20]

Three phases, in one process, on one local Spark session and one embedded broker:

1. throughput: ``--events`` JSON events are produced first, then the service is started and works
   through the backlog in micro-batches of ``--max-offsets-per-trigger``. Reported: the first
   (cold) micro-batch's seconds, the steady-state rate over the later micro-batches (from the
   query's progress: rows / wall time from the second batch's start to the last batch's end),
   and the overall rate from the query's start to the last prediction read back;
2. peer: the same backlog through the same Kafka source and sink with no scoring stage (a
   streaming passthrough with the same batch limit), measured the same way: the connector's ceiling;
3. latency: events produced at ``--latency-rate`` for ``--latency-seconds`` into the running
   service; latency = time a prediction is read back - its event's produce timestamp.

Scoring runs on the CPU with ``inference.pipeline_depth = 0``, the setting for CPU-only hosts
(see docs/inference.md).

Prints a table to stderr and, as its last line, one JSON object.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import threading
import time

import numpy as np

from streamhydro.broker import EmbeddedBroker
from streamhydro.config import Config
from streamhydro.driver.serve import Service
from streamhydro.kafka.admin import ensure_topics
from streamhydro.kafka.source import FORMAT
from streamhydro.producer import LoadGenerator
from streamhydro.registry import Registry

PARTITIONS = 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=400_000)
    parser.add_argument("--latency-rate", type=float, default=5000.0)
    parser.add_argument("--latency-seconds", type=float, default=20.0)
    parser.add_argument("--max-offsets-per-trigger", type=int, default=100_000)
    parser.add_argument("--registry", default="models")
    parser.add_argument("--model", default="breast_cancer")
    args = parser.parse_args()
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

    manifest = Registry(args.registry).get(args.model, "promoted").manifest
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory(prefix="streamhydro-bench-") as work:
        bootstrap = broker.bootstrap_servers
        ensure_topics(bootstrap, {"events": PARTITIONS, "predictions": PARTITIONS, "predictions-dlq": 1, "passthrough": PARTITIONS})
        LoadGenerator(bootstrap, "events", manifest).run(args.events, None, threading.Event())

        config = Config().replace(
            spark={"master": "local[2]", "app_name": "streamhydro-bench", "checkpoint_location": f"{work}/serve"},
            kafka={"bootstrap_servers": bootstrap, "subscribe": "events", "source": "python",
                   "max_offsets_per_trigger": args.max_offsets_per_trigger},
            model={"registry": args.registry, "name": args.model},
            inference={"providers": ["CPUExecutionProvider"], "pipeline_depth": 0},
            metrics={"enabled": False},
        )
        service = Service(config)
        service.start()
        started = time.monotonic()
        reader = Reader(bootstrap, "predictions")
        reader.wait_for(args.events)
        serve_seconds = reader.last_at - started
        serve_progress = list(service.query.recentProgress)

        latencies = measure_latency(bootstrap, manifest, reader, args.latency_rate, args.latency_seconds)
        in_topic = reader.count
        service.stop()
        reader.close()

        passthrough_progress = passthrough(service.spark, config, work, in_topic)

    serve_cold, serve_steady = progress_rates(serve_progress)
    _, passthrough_steady = progress_rates(passthrough_progress)
    result = {
        "events": args.events,
        "max_offsets_per_trigger": args.max_offsets_per_trigger,
        "serve_first_batch_seconds": serve_cold,
        "serve_steady_events_per_s": serve_steady,
        "serve_overall_events_per_s": round(args.events / serve_seconds, 1),
        "passthrough_steady_events_per_s": passthrough_steady,
        "serve_vs_passthrough_steady": round(serve_steady / passthrough_steady, 3),
        "latency_rate_per_s": args.latency_rate,
        "latency_events": len(latencies),
        "latency_p50_ms": round(float(np.percentile(latencies, 50)), 1) if latencies else None,
        "latency_p99_ms": round(float(np.percentile(latencies, 99)), 1) if latencies else None,
        "cpus": os.cpu_count(),
    }
    for key, value in result.items():
        print(f"{key:>32}  {value}", file=sys.stderr)
    print(json.dumps(result))


def progress_rates(progress: list[dict]) -> tuple[float, float]:
    """(seconds of the first micro-batch with rows, rows/s over the later ones) from query progress."""
    batches = [p for p in progress if p["numInputRows"] > 0]
    if len(batches) < 2:
        raise SystemExit("fewer than two micro-batches: raise --events or lower --max-offsets-per-trigger")

    def start(p: dict) -> float:
        return datetime.datetime.fromisoformat(p["timestamp"].replace("Z", "+00:00")).timestamp()

    later = batches[1:]
    wall = start(later[-1]) + later[-1]["durationMs"]["triggerExecution"] / 1000 - start(later[0])
    return batches[0]["durationMs"]["triggerExecution"] / 1000, round(sum(p["numInputRows"] for p in later) / wall, 1)


class Reader:
    """Reads a topic from the beginning with confluent-kafka; keeps counts and produce->read latencies."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        self._consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench", "enable.auto.commit": False})
        self._consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(PARTITIONS)])
        self.count = 0
        self.last_at = 0.0

    def wait_for(self, total: int, record_latency_after_ms: float | None = None, latencies: list | None = None) -> None:
        while self.count < total:
            messages = self._consumer.consume(min(50_000, total - self.count), timeout=0.5)
            now_ms = time.time() * 1000
            for message in messages:
                if latencies is not None:
                    event_ms = json.loads(message.value())["source"]["timestamp_ms"]
                    if event_ms >= record_latency_after_ms:
                        latencies.append(now_ms - event_ms)
            if messages:
                self.count += len(messages)
                self.last_at = time.monotonic()

    def close(self) -> None:
        self._consumer.close()


def measure_latency(bootstrap: str, manifest, reader: Reader, rate: float, seconds: float) -> list[float]:
    count = int(rate * seconds)
    start_ms = time.time() * 1000
    generator = LoadGenerator(bootstrap, "events", manifest, seed=7)
    producing = threading.Thread(target=generator.run, args=(count, rate, threading.Event()))
    producing.start()
    latencies: list[float] = []
    reader.wait_for(reader.count + count, start_ms, latencies)
    producing.join()
    return latencies


def passthrough(spark, config: Config, work: str, events: int) -> list[dict]:
    """The same backlog through the same source and sink, with no scoring: the connector's ceiling."""
    k = config.kafka
    stream = spark.readStream.format(FORMAT).options(**k.source_options()).load()
    query = (
        stream.selectExpr("key", "value", "headers", "'passthrough' AS topic")
        .writeStream.format(FORMAT)
        .options(**k.client_options())
        .option("checkpointLocation", f"{work}/passthrough")
        .trigger(availableNow=True)
        .start()
    )
    query.awaitTermination()
    reader = Reader(k.bootstrap_servers, "passthrough")
    reader.wait_for(events)
    reader.close()
    return list(query.recentProgress)


if __name__ == "__main__":
    main()
