"""``streamhydro demo``: the whole service on an embedded default. Runs on the driver.

An embedded Kafka-protocol broker, local Spark, the model shipped in ``models/``, the load
generator in a thread, and a reader of the output topics that counts what comes out. A progress
line shows events in, predictions out, rate and lag; Ctrl-C stops every part. With
``--events N`` it exits once N events have come out (as predictions or dead letters) and prints,
as its last line, a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

from streamhydro.config import Config
from streamhydro.producer import add_event_arguments

log = logging.getLogger(__name__)

INPUT_TOPIC = "events"
INPUT_PARTITIONS = 2
PROGRESS_SECONDS = 1.0


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run everything embedded: broker, Spark, model, load generator",
        description="Start an embedded Kafka-protocol broker, the inference service on local Spark with the model in "
        "models/, and a load generator; show events in, predictions out, rate and lag. Ctrl-C stops everything.",
    )
    parser.add_argument("--events", type=int, default=0, help="exit after N events were scored and print a JSON summary (default: run until Ctrl-C)")
    parser.add_argument("--rate", type=float, default=None, help="events per second (default: 2000 interactive, unthrottled with --events)")
    add_event_arguments(parser)
    parser.add_argument("--master", default="local[2]", help="Spark master (default %(default)s)")
    parser.add_argument("--metrics-port", type=int, default=9108, help="port of the metrics endpoint; 0 = any free port (default %(default)s)")
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    summary = run_demo(
        events=args.events or None,
        rate=args.rate if args.rate is not None else (None if args.events else 2000.0),
        bad_fraction=args.bad_fraction,
        payload=args.payload,
        registry=args.registry,
        model=args.model,
        master=args.master,
        metrics_port=args.metrics_port,
    )
    print(json.dumps(summary))
    return 0


def run_demo(
    events: int | None,
    rate: float | None,
    bad_fraction: float,
    payload: str,
    registry: str,
    model: str,
    master: str,
    metrics_port: int = 9108,
) -> dict[str, Any]:
    """Run the demo; returns the summary. ``events=None`` runs until SIGINT/SIGTERM."""
    from streamhydro.broker import EmbeddedBroker
    from streamhydro.driver.serve import Service
    from streamhydro.kafka.admin import ensure_topics
    from streamhydro.producer import LoadGenerator

    stop = threading.Event()
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory(prefix="streamhydro-demo-") as work:
        config = Config().replace(
            spark={"master": master, "app_name": "streamhydro-demo", "checkpoint_location": f"{work}/checkpoint"},
            kafka={"bootstrap_servers": broker.bootstrap_servers, "subscribe": INPUT_TOPIC},
            model={"registry": registry, "name": model, "version": "promoted", "payload": payload},
            # local Spark assigns no GPUs, so scoring runs on the CPU, where pipelining does not pay.
            inference={"pipeline_depth": 0},
            metrics={"port": metrics_port, "multiprocess_dir": f"{work}/metrics"},
        )
        k = config.kafka
        ensure_topics(k.bootstrap_servers, {INPUT_TOPIC: INPUT_PARTITIONS, k.output_topic: INPUT_PARTITIONS, k.dead_letter_topic: 1})
        _say(f"embedded broker at {broker.bootstrap_servers} (log: {broker.log_path}); starting Spark ({master})...")
        service = Service(config)
        service.start(on_signal=stop.set)
        manifest = service.follower.plan.manifest
        _say(f"serving {manifest.name}:{manifest.version}; {INPUT_TOPIC} -> {k.output_topic} (dead letters -> {k.dead_letter_topic})")
        reader = OutputReader(k.bootstrap_servers, (k.output_topic, k.dead_letter_topic))
        generator = LoadGenerator(k.bootstrap_servers, INPUT_TOPIC, manifest, payload, bad_fraction)
        reader.start()
        started = time.monotonic()
        producing = threading.Thread(target=generator.run, args=(events, rate, stop), name="load-generator", daemon=True)
        producing.start()
        try:
            _watch(events, generator, reader, service, stop, started)
        finally:
            stop.set()
            producing.join()
            generator.close()
            service.stop()
            reader.stop()
            # Python workers keep Kafka clients; end them before the broker goes.
            service.spark.stop()
        seconds = (reader.last_at or time.monotonic()) - started
        outputs = reader.counts
        return {
            "events": generator.sent,
            "predictions": outputs[k.output_topic],
            "dead_letters": outputs[k.dead_letter_topic],
            "bad_sent": sum(generator.bad.values()),
            "seconds": round(seconds, 3),
            "events_per_s": round(generator.sent / seconds, 1) if seconds > 0 else 0.0,
            "model": f"{manifest.name}:{manifest.version}",
            "micro_batches": service.batches,
        }


def _watch(events: int | None, generator: Any, reader: "OutputReader", service: Any, stop: threading.Event, started: float) -> None:
    interactive = sys.stderr.isatty()
    shown_sample = False
    previous, previous_at = 0, started
    while not stop.wait(PROGRESS_SECONDS):
        if not service.query.isActive:
            raise RuntimeError(f"the streaming query stopped: {service.query.exception()}")
        done = reader.total
        now = time.monotonic()
        rate = (done - previous) / (now - previous_at)
        previous, previous_at = done, now
        counts = reader.counts
        line = (
            f"events in {generator.sent:>9,} | predictions {counts[service.config.kafka.output_topic]:>9,} | "
            f"dead letters {counts[service.config.kafka.dead_letter_topic]:>6,} | {rate:>9,.0f}/s | lag {generator.sent - done:>8,}"
        )
        print(f"\r{line}" if interactive else line, end="" if interactive else "\n", file=sys.stderr, flush=True)
        if not shown_sample and reader.sample is not None:
            shown_sample = True
            print(("\n" if interactive else "") + f"a prediction: {reader.sample}", file=sys.stderr, flush=True)
        if events is not None and done >= events:
            break
    if interactive:
        print(file=sys.stderr)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class OutputReader:
    """Counts records arriving on the output topics (a thread with its own confluent-kafka consumer)."""

    def __init__(self, bootstrap_servers: str, topics: Sequence[str]) -> None:
        from confluent_kafka import Consumer

        self._consumer = Consumer(
            {"bootstrap.servers": bootstrap_servers, "group.id": "streamhydro-demo-reader", "enable.auto.commit": False}
        )
        self._topics = tuple(topics)
        self.counts = {topic: 0 for topic in topics}
        self.sample: str | None = None
        self.last_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="output-reader", daemon=True)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def start(self) -> None:
        from confluent_kafka import OFFSET_BEGINNING, TopicPartition

        metadata = self._consumer.list_topics(timeout=10)
        self._consumer.assign(
            [TopicPartition(t, p, OFFSET_BEGINNING) for t in self._topics for p in metadata.topics[t].partitions]
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._consumer.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            messages = self._consumer.consume(10_000, timeout=0.2)
            for message in messages:
                if message.error() is None:
                    self.counts[message.topic()] += 1
                    if self.sample is None and message.topic() == self._topics[0]:
                        self.sample = message.value().decode()
            if messages:
                self.last_at = time.monotonic()
