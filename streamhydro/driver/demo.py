"""``streamhydro demo``: the whole service on an embedded default. Runs on the driver.

A local broker (Apache Kafka from the jar cache by default, or Tansu), local Spark, the model shipped
in ``models/``, the load generator in a thread, and a reader of the output topics that counts what
comes out. A progress line shows events in, predictions out, rate, lag and latency; Ctrl-C stops every
part. With ``--events N`` it exits once N events have come out (as predictions or dead letters) and
prints, as its last line, a JSON summary: ``cold_start_s`` (demo start -> first prediction),
``steady_events_per_s`` (predictions after the first 10 % over their arrival span) and the
produce->prediction ``latency_p50_ms`` / ``latency_p99_ms`` of a live stream. Without ``--rate`` the N
events go out unthrottled, a backlog whose latency would be queueing, so a live phase follows:
``LIVE_RATE`` events/s for ``LIVE_SECONDS``, produced as a live producer sends (``linger.ms=1``), and
the latency is that phase's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from streamhydro.config import Config
from streamhydro.errors import ConfigError
from streamhydro.outputs import OutputReader
from streamhydro.producer import add_event_arguments
from streamhydro.kafka.options import Connector, EndOffsets
from streamhydro.payload import PayloadFormat
from streamhydro.registry import KINDS, Selector

log = logging.getLogger(__name__)

INPUT_TOPIC = "events"
INPUT_PARTITIONS = 2
PROGRESS_SECONDS = 1.0
LIVE_RATE = 1000.0
LIVE_SECONDS = 5.0
LIVE_DEADLINE_S = 120.0


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
    parser.add_argument("--broker", choices=("kafka", "tansu"), default="kafka", help="local broker: Apache Kafka (Java, the jar cache) or Tansu (no Java, in memory, not for live streams of small batches) (default %(default)s)")
    parser.add_argument("--source", type=Connector, choices=list(Connector), default=Connector.BUILTIN, help="Kafka connector, as kafka.source in serve's config (default %(default)s)")
    parser.add_argument("--master", default="local[2]", help="Spark master (default %(default)s)")
    parser.add_argument("--metrics-port", type=int, default=9108, help="port of the metrics endpoint; 0 = any free port (default %(default)s)")
    parser.add_argument("--mapping", type=Path, metavar="FILE.toml",
                        help="with --model MODEL.onnx: its input mapping, as for `streamhydro models add`")
    parser.add_argument("--kind", choices=KINDS, help="with --model MODEL.onnx: what its prediction is (default: from the graph)")
    parser.add_argument("--labels", help="with --model MODEL.onnx: comma-separated class labels, when the graph has none")
    parser.set_defaults(run=_run, third_party_log="streamhydro-demo.log")


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
        broker=args.broker,
        source=args.source,
        added=AddedModel(args.mapping, args.kind, tuple(filter(None, (args.labels or "").split(",")))),
    )
    print(json.dumps(summary))
    return 0


def run_demo(
    events: int | None,
    rate: float | None,
    bad_fraction: float,
    payload: PayloadFormat,
    registry: str,
    model: str,
    master: str,
    metrics_port: int = 9108,
    broker: str = "kafka",
    source: Connector = Connector.BUILTIN,
    added: AddedModel | None = None,
) -> dict[str, Any]:
    """Run the demo; returns the summary. ``events=None`` runs until SIGINT/SIGTERM.

    ``model`` is a model name in ``registry``, or the path of an ONNX file, which is added (as
    ``streamhydro models add`` would, with ``added``'s mapping, kind and labels) to a scratch registry
    that lives as long as the demo.
    """
    from streamhydro.brokers import BROKERS
    from streamhydro.driver.serve import Service
    from streamhydro.kafka.admin import ensure_topics
    from streamhydro.producer import LoadGenerator

    launched = time.monotonic()
    kafka_settings = {"subscribe": INPUT_TOPIC, "source": source}
    if broker == "tansu":
        if source == Connector.BUILTIN:
            raise ConfigError("--source", "builtin cannot read from Tansu: its ListOffsets answer is wrong", "add --source python, or use --broker kafka")
        kafka_settings.update(end_offsets_from=EndOffsets.FETCH)
    stop = threading.Event()
    with tempfile.TemporaryDirectory(prefix="streamhydro-demo-") as work, BROKERS[broker]() as running:
        if model.endswith(".onnx"):
            registry, model = _add_to_scratch_registry(Path(model), Path(work) / "models", added or AddedModel())
        config = Config().replace(
            spark={"master": master, "app_name": "streamhydro-demo", "checkpoint_location": f"{work}/checkpoint"},
            kafka={"bootstrap_servers": running.bootstrap_servers, **kafka_settings},
            model={"registry": registry, "name": model, "version": Selector.PROMOTED},
            payload=_payload_settings(payload, registry, model, work),
            metrics={"port": metrics_port, "multiprocess_dir": f"{work}/metrics"},
        )
        k = config.kafka
        client = k.librdkafka()
        ensure_topics(client, {INPUT_TOPIC: INPUT_PARTITIONS, k.output_topic: INPUT_PARTITIONS, k.dead_letter_topic: 1})
        _say(f"{broker} broker at {running.bootstrap_servers} (log: {running.log_path}); starting Spark ({master})...")
        service = Service(config)
        service.start(on_signal=stop.set)
        manifest = service.follower.plan.manifest
        _say(f"serving {manifest.name}:{manifest.version}; {INPUT_TOPIC} -> {k.output_topic} (dead letters -> {k.dead_letter_topic})")
        reader = OutputReader(client, (k.output_topic, k.dead_letter_topic), track=True, group="streamhydro-demo-reader")
        generator = LoadGenerator(client, INPUT_TOPIC, manifest, payload, bad_fraction)
        reader.start()
        started = time.monotonic()
        producing = threading.Thread(target=generator.run, args=(events, rate, stop), name="load-generator", daemon=True)
        producing.start()
        live_since, live_rate, live_sent = 0, rate, 0
        try:
            _watch(events, generator, reader, service, stop, started)
            seconds = (reader.last_at or time.monotonic()) - started
            steady = reader.steady_rate()
            if events is not None and rate is None and not stop.is_set():
                live_since, live_rate = reader.distinct, LIVE_RATE
                live_sent = _live_phase(client, manifest, payload, reader, stop)
        finally:
            stop.set()
            producing.join()
            generator.close()
            service.stop()
            reader.stop()
            # Python workers keep Kafka clients; end them before the broker goes.
            service.spark.stop()
        outputs = reader.counts
        return {
            "events": generator.sent + live_sent,
            "predictions": outputs[k.output_topic],
            "dead_letters": outputs[k.dead_letter_topic],
            "bad_sent": sum(generator.bad.values()),
            "seconds": round(seconds, 3),
            "cold_start_s": round(reader.first_at - launched, 1) if reader.first_at else None,
            "events_per_s": round(generator.sent / seconds, 1) if seconds > 0 else 0.0,
            "steady_events_per_s": steady,
            "model": f"{manifest.name}:{manifest.version}",
            "broker": broker,
            "connector": service.config.kafka.source,
            "micro_batches": service.batches,
            "latency_rate_per_s": live_rate,
            **latency_summary(reader.latency_ms(since=live_since)),
        }


@dataclasses.dataclass(frozen=True)
class AddedModel:
    """How ``demo --model MODEL.onnx`` adds the file: ``models add``'s --mapping, --kind and --labels."""

    mapping: Path | None = None
    kind: str | None = None
    labels: tuple[str, ...] = ()


def _add_to_scratch_registry(path: Path, root: Path, added: AddedModel) -> tuple[str, str]:
    """Add the ONNX file at ``path`` to a registry at ``root``; returns (registry, model name)."""
    from streamhydro.models_add import add_model, describe
    from streamhydro.models_command import input_mapping
    from streamhydro.registry import Registry

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError("--model", f"cannot read {path} ({exc.strerror})", "give a model name in --registry, or the path of an ONNX file") from exc
    name = re.sub(r"[^A-Za-z0-9._-]", "_", path.stem).lstrip("._-") or "model"
    version = add_model(
        Registry(root), data, name, kind=added.kind, labels=added.labels,
        mapping=input_mapping(added.mapping, [], []), provenance={"file": str(path)}, promote=True,
    )
    _say(f"added {path} as {version.label} (kind {version.manifest.kind}) to a scratch registry:")
    for line in describe(version.manifest):
        _say(f"  {line}")
    return str(root), name


def _payload_settings(payload: PayloadFormat, registry: str, model: str, work: str) -> dict[str, str]:
    """The demo's [payload]: avro and protobuf are sent bare, with the schema derived from the model in a file."""
    from streamhydro.producer import EventFormat
    from streamhydro.registry import Registry

    if payload not in (PayloadFormat.AVRO, PayloadFormat.PROTOBUF):
        return {"format": payload}
    path = Path(work) / ("events.avsc" if payload == PayloadFormat.AVRO else "events.proto")
    path.write_text(EventFormat(Registry(registry).get(model, Selector.PROMOTED).manifest, payload).schema)
    return {"format": payload, "schema": str(path)}


def _live_phase(client: Any, manifest: Any, payload: PayloadFormat, reader: OutputReader, stop: threading.Event) -> int:
    """Events at LIVE_RATE for LIVE_SECONDS, as a live producer sends them; returns how many, once all are scored."""
    from streamhydro.producer import LoadGenerator

    count = int(LIVE_RATE * LIVE_SECONDS)
    expected = reader.distinct + count
    _say(f"live: {count:,} events at {LIVE_RATE:,.0f}/s for the latency")
    live = LoadGenerator(client.with_defaults({"linger.ms": "1"}), INPUT_TOPIC, manifest, payload, seed=1)
    try:
        live.run(count, LIVE_RATE, stop)
    finally:
        live.close()
    deadline = time.monotonic() + LIVE_DEADLINE_S
    while reader.distinct < expected and time.monotonic() < deadline and not stop.wait(0.05):
        pass
    if reader.distinct < expected:
        raise RuntimeError(f"live phase: {expected - reader.distinct} of {count} events without a prediction after {LIVE_DEADLINE_S:.0f} s")
    return live.sent


def _watch(events: int | None, generator: Any, reader: OutputReader, service: Any, stop: threading.Event, started: float) -> None:
    interactive = sys.stderr.isatty()
    shown_sample = False
    previous, previous_at, latencies_seen = 0, started, 0
    while not stop.wait(PROGRESS_SECONDS):
        if not service.query.isActive:
            raise RuntimeError(f"the streaming query stopped: {service.query.exception()}")
        done = reader.total
        now = time.monotonic()
        rate = (done - previous) / (now - previous_at)
        previous, previous_at = done, now
        counts = reader.counts
        recent = reader.latency_ms(since=latencies_seen)
        latencies_seen += len(recent)
        latency = f"{np.percentile(recent, 50):>7,.0f} ms" if len(recent) else "      - ms"
        line = (
            f"events in {generator.sent:>9,} | predictions {counts[service.config.kafka.output_topic]:>9,} | "
            f"dead letters {counts[service.config.kafka.dead_letter_topic]:>6,} | {rate:>9,.0f}/s | lag {generator.sent - done:>8,} | "
            f"latency p50 {latency}"
        )
        print(f"\r{line}" if interactive else line, end="" if interactive else "\n", file=sys.stderr, flush=True)
        if not shown_sample and reader.sample is not None:
            shown_sample = True
            print(("\n" if interactive else "") + f"a prediction: {reader.sample}", file=sys.stderr, flush=True)
        if events is not None and done >= events:
            break
    if interactive:
        print(file=sys.stderr)


def latency_summary(latency_ms: np.ndarray) -> dict[str, float | None]:
    """p50 and p99 of produce->prediction latencies, in ms (None without predictions)."""
    if not len(latency_ms):
        return {"latency_p50_ms": None, "latency_p99_ms": None}
    p50, p99 = np.percentile(latency_ms, [50, 99])
    return {"latency_p50_ms": round(float(p50), 1), "latency_p99_ms": round(float(p99), 1)}


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
