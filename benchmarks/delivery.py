"""The cost of exactly-once: ``serve`` with ``kafka.delivery = at_least_once`` and ``exactly_once``, in one run.

    python benchmarks/delivery.py [--events 400000] [--latency-rate 2000] [--latency-seconds 20] [--rounds 2]

One process, one local[2] Spark session, one Apache Kafka broker, the demo model, the same events, and
streamhydro's connector for both modes (exactly-once needs it). The modes take turns for ``--rounds``
rounds and the last round is reported (the first one also warms up the JVM, the Python workers and the
broker, which would favour whichever mode ran second). Per mode and round, two phases:

1. throughput: ``--events`` JSON events lie in the input topic (2 partitions) before the query starts; it
   works through them in micro-batches of ``--max-offsets-per-trigger``. Reported: ``cold_start_s`` (query
   start -> first prediction), ``steady_events_per_s`` (predictions after the first 10 % / their arrival
   span), ``missing`` and ``duplicates`` (both must be 0);
2. latency: the query runs on an empty topic, then events are produced live at ``--latency-rate`` for
   ``--latency-seconds`` (``linger.ms=1``); latency = arrival of the prediction - the event's producer
   timestamp, p50 and p99.

Both modes' outputs are read with ``isolation.level=read_committed``, as exactly-once consumers must read
(for at-least-once output it changes nothing): a prediction counts when a consumer can see it. Scoring runs
on the CPU with ``inference.pipeline_depth = 0``. Prints a table to stderr and, as its last line, one JSON
object with both modes and the ratios exactly_once / at_least_once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
from collections.abc import Callable
from typing import Any

from end_to_end import Starter, latency, ratio, throughput
from streamhydro.brokers import ApacheKafkaBroker
from streamhydro.config import Config
from streamhydro.driver.serve import Service
from streamhydro.kafka.admin import ensure_topics
from streamhydro.kafka.options import client_for
from streamhydro.producer import LoadGenerator
from streamhydro.registry import Registry
from streamhydro.spark import Master, streaming_session

PARTITIONS = 2
BATCH_SIZE = 4096
MODES = ("at_least_once", "exactly_once")
READ_COMMITTED = {"isolation.level": "read_committed"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=400_000)
    parser.add_argument("--latency-rate", type=float, default=2000.0)
    parser.add_argument("--latency-seconds", type=float, default=20.0)
    parser.add_argument("--max-offsets-per-trigger", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--deadline-seconds", type=float, default=600.0)
    parser.add_argument("--registry", default="models")
    parser.add_argument("--model", default="breast_cancer")
    args = parser.parse_args()
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

    model = Registry(args.registry).get(args.model, "promoted")
    spark = streaming_session(Master.parse("local[2]"), "streamhydro-bench-delivery", {"spark.ui.enabled": "false"})
    rows: dict[str, dict[str, Any]] = {}
    with ApacheKafkaBroker() as broker, tempfile.TemporaryDirectory(prefix="streamhydro-bench-") as work:
        bootstrap = broker.bootstrap_servers
        ensure_topics(client_for(bootstrap), {"events": PARTITIONS})
        LoadGenerator(client_for(bootstrap), "events", model.manifest).run(args.events, None, threading.Event())
        for turn in range(args.rounds):
            for mode in MODES:
                start = starter(mode, bootstrap, args, work)
                name = f"{mode}-r{turn}"
                rows[mode] = {
                    **throughput(start, bootstrap, name, args, READ_COMMITTED),
                    **latency(start, bootstrap, name, model.manifest, args, READ_COMMITTED),
                }
    spark.stop()
    mine, theirs = rows["exactly_once"], rows["at_least_once"]
    result: dict[str, Any] = {
        "events": args.events, "max_offsets_per_trigger": args.max_offsets_per_trigger, "rounds": args.rounds,
        "latency_rate_per_s": args.latency_rate, "cpus": os.cpu_count(), **rows,
        "exactly_once_vs_at_least_once": {
            "steady_throughput": ratio(mine["steady_events_per_s"], theirs["steady_events_per_s"]),
            "latency_p50": ratio(mine["latency_p50_ms"], theirs["latency_p50_ms"]),
            "latency_p99": ratio(mine["latency_p99_ms"], theirs["latency_p99_ms"]),
        },
    }
    for key, value in result.items():
        print(f"{key:>30}  {value}", file=sys.stderr)
    print(json.dumps(result))


def starter(mode: str, bootstrap: str, args: argparse.Namespace, work: str) -> Starter:
    """A function that starts serve in ``mode`` reading ``input`` and writing ``output`` (a checkpoint per
    output topic) and returns the function that stops it."""

    def start(input_topic: str, output_topic: str, tag: str) -> Callable[[], None]:
        config = Config().replace(
            spark={"master": "local[2]", "app_name": f"bench-{mode}", "checkpoint_location": f"{work}/{output_topic}"},
            kafka={"bootstrap_servers": bootstrap, "subscribe": input_topic, "output_topic": output_topic,
                   "dead_letter_topic": f"{output_topic}-dlq", "source": "python", "delivery": mode,
                   "max_offsets_per_trigger": args.max_offsets_per_trigger},
            model={"registry": args.registry, "name": args.model},
            inference={"providers": ["CPUExecutionProvider"], "pipeline_depth": 0, "batch_size": BATCH_SIZE},
            metrics={"enabled": False},
        )
        service = Service(config)
        service.start()
        return service.stop

    return start


if __name__ == "__main__":
    main()
