"""End to end on Apache Kafka: ``serve`` with each connector against the pipeline users would build instead.

    python benchmarks/end_to_end.py [--events 400000] [--latency-rate 5000] [--latency-seconds 20]

Contenders, in one process, on one local[2] Spark session, one broker, the demo model and the same events:

- ``serve_python``: the service with streamhydro's connector (each task reads, scores and writes its range);
- ``serve_builtin``: the service with Spark's JVM Kafka source and sink;
- ``ceiling``: no Spark: one Python thread loops over the input's new offset ranges, each through the
  service's own task function (:func:`streamhydro.executor.direct.score_range`: consume -> decode -> ONNX
  Runtime -> encode -> produce, the same code), what one process can do;
- ``peer``: Spark's JVM Kafka source -> ``from_json`` -> ``pyspark.ml.functions.predict_batch_udf`` (ONNX
  Runtime, the same model and batch size) -> ``to_json`` -> Spark's JVM Kafka sink: what a Spark user
  writes without streamhydro.

Two phases per contender:

1. throughput: ``--events`` JSON events lie in the input topic before the query starts; it works through
   them in micro-batches of ``--max-offsets-per-trigger``. A reader on the output topic takes the time as
   each batch of predictions arrives. Reported: ``cold_start_s`` (query start -> first prediction),
   ``steady_events_per_s`` (predictions after the first 10 % / their arrival span), and ``missing``
   (events without a prediction: must be 0);
2. latency: the query runs on an empty topic, then events are produced live at ``--latency-rate`` for
   ``--latency-seconds`` (``linger.ms=1``); latency = arrival of the prediction - the event's producer
   timestamp, p50 and p99.

Scoring runs on the CPU with ``inference.pipeline_depth = 0``, the setting for CPU-only hosts. Every wait
has a deadline (``--deadline-seconds``). Prints a table to stderr and, as its last line, one JSON object
with every row and the ratios of each serve contender to the peer and to the ceiling.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from types import SimpleNamespace
from typing import Any

from streamhydro.brokers import ApacheKafkaBroker
from streamhydro.config import Config, PayloadSettings
from streamhydro.driver.demo import latency_summary
from streamhydro.driver.serve import Service, connector_conf
from streamhydro.executor.direct import RangeIO, score_range
from streamhydro.executor.engine import EngineSettings
from streamhydro.executor.scoring import ScoringPlan
from streamhydro.executor.sessions import TaskResources
from streamhydro.kafka.admin import ensure_topics
from streamhydro.kafka.offsets import EndOffsetProbe
from streamhydro.kafka.options import Connector, client_for
from streamhydro.kafka.planning import OffsetRange
from streamhydro.outputs import OutputReader, topic_ends
from streamhydro.producer import LoadGenerator
from streamhydro.registry import Registry
from streamhydro.spark import Master, checkpoint_conf, streaming_session

PARTITIONS = 2
BATCH_SIZE = 4096
CONTENDERS = ("ceiling", "serve_python", "serve_builtin", "peer")
IDLE_POLL_S = 0.005


def arguments(doc: str, latency_rate: float, max_offsets: int) -> argparse.ArgumentParser:
    """The options every end-to-end benchmark takes (this one and ``delivery.py``)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=400_000)
    parser.add_argument("--latency-rate", type=float, default=latency_rate)
    parser.add_argument("--latency-seconds", type=float, default=20.0)
    parser.add_argument("--max-offsets-per-trigger", type=int, default=max_offsets)
    parser.add_argument("--deadline-seconds", type=float, default=600.0)
    parser.add_argument("--registry", default="models")
    parser.add_argument("--model", default="breast_cancer")
    return parser


def backlog(bootstrap: str, manifest, events: int) -> None:
    """``events`` events in topic ``events`` (the throughput phase's input), before any query starts."""
    ensure_topics(client_for(bootstrap), {"events": PARTITIONS})
    LoadGenerator(client_for(bootstrap), "events", manifest).run(events, None, threading.Event())


def main() -> None:
    args = arguments(__doc__, latency_rate=5000.0, max_offsets=100_000).parse_args()
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

    model = Registry(args.registry).get(args.model, "promoted")
    # Every contender gets what serve sets for a local checkpoint (the peer too: it shares the session).
    conf = {"spark.ui.enabled": "false", **checkpoint_conf(tempfile.gettempdir()), **connector_conf(Connector.BUILTIN, {})}
    spark = streaming_session(Master.parse("local[2]"), "streamhydro-bench", conf)
    rows: dict[str, dict[str, Any]] = {}
    with ApacheKafkaBroker() as broker, tempfile.TemporaryDirectory(prefix="streamhydro-bench-") as work:
        bootstrap = broker.bootstrap_servers
        backlog(bootstrap, model.manifest, args.events)
        for name in CONTENDERS:
            start = contender(name, spark, bootstrap, model, args, work)
            rows[name] = {
                **throughput(start, bootstrap, name, args),
                **latency(start, bootstrap, name, model.manifest, args),
            }
    spark.stop()
    result: dict[str, Any] = {"events": args.events, "max_offsets_per_trigger": args.max_offsets_per_trigger,
                              "latency_rate_per_s": args.latency_rate, "cpus": os.cpu_count(), **rows}
    for name in ("serve_python", "serve_builtin"):
        for other in ("peer", "ceiling"):
            result[f"{name}_vs_{other}"] = compared(rows[name], rows[other])
    for key, value in result.items():
        print(f"{key:>28}  {value}", file=sys.stderr)
    print(json.dumps(result))


def ratio(mine: float | None, theirs: float | None) -> float | None:
    return round(mine / theirs, 3) if mine and theirs else None


def compared(mine: Mapping[str, Any], theirs: Mapping[str, Any]) -> dict[str, float | None]:
    """One row's throughput and latency as ratios to another's."""
    return {
        "steady_throughput": ratio(mine["steady_events_per_s"], theirs["steady_events_per_s"]),
        "latency_p50": ratio(mine["latency_p50_ms"], theirs["latency_p50_ms"]),
        "latency_p99": ratio(mine["latency_p99_ms"], theirs["latency_p99_ms"]),
    }


Starter = Callable[[str, str, str], Callable[[], None]]


def contender(name: str, spark, bootstrap: str, model, args: argparse.Namespace, work: str) -> Starter:
    """A function that starts ``name`` reading ``input`` and writing ``output`` (checkpoint under ``tag``)
    and returns the function that stops it."""

    def start_peer(input_topic: str, output_topic: str, tag: str) -> Callable[[], None]:
        query = peer_query(spark, bootstrap, input_topic, output_topic, f"{work}/{name}-{tag}", model, args.max_offsets_per_trigger)
        return query.stop

    def start_ceiling(input_topic: str, output_topic: str, tag: str) -> Callable[[], None]:
        return ceiling(bootstrap, model, input_topic, output_topic, args.max_offsets_per_trigger // PARTITIONS)

    if name == "peer":
        return start_peer
    if name == "ceiling":
        return start_ceiling
    return serve_starter(name, bootstrap, args, work, {"source": name.removeprefix("serve_")})


def serve_starter(name: str, bootstrap: str, args: argparse.Namespace, work: str, kafka: Mapping[str, str]) -> Starter:
    """A Starter of ``serve`` in this process: CPU scoring, sequential, metrics off; ``kafka`` keys on top."""

    def start(input_topic: str, output_topic: str, tag: str) -> Callable[[], None]:
        config = Config().replace(
            spark={"master": "local[2]", "app_name": f"bench-{name}", "checkpoint_location": f"{work}/{name}-{tag}"},
            kafka={"bootstrap_servers": bootstrap, "subscribe": input_topic, "output_topic": output_topic,
                   "dead_letter_topic": f"{output_topic}-dlq", "max_offsets_per_trigger": args.max_offsets_per_trigger,
                   **kafka},
            model={"registry": args.registry, "name": args.model},
            inference={"providers": ["CPUExecutionProvider"], "pipeline_depth": 0, "batch_size": BATCH_SIZE},
            metrics={"enabled": False},
        )
        service = Service(config)
        service.start()
        return service.stop

    return start


def ceiling(bootstrap: str, model, input_topic: str, output_topic: str, max_per_range: int) -> Callable[[], None]:
    """Start the no-Spark loop on a thread; returns the function that stops it (and raises what it raised)."""
    plan = ScoringPlan(
        model.manifest, SimpleNamespace(value=model.read_bytes()), PayloadSettings(), output_topic, f"{output_topic}-dlq",
        EngineSettings(providers=("CPUExecutionProvider",), batch_size=BATCH_SIZE, pipeline_depth=0, intra_op_threads=1),
    )
    io = RangeIO(client_for(bootstrap))
    probe = EndOffsetProbe(client_for(bootstrap))
    stop = threading.Event()
    failure: list[BaseException] = []

    def loop() -> None:
        done: dict[tuple[str, int], int] = {}
        try:
            while not stop.is_set():
                ends = probe.list_offsets([(input_topic, p) for p in range(PARTITIONS)])
                ranges = [
                    OffsetRange(topic, partition, done.get((topic, partition), low), min(high, done.get((topic, partition), low) + max_per_range))
                    for (topic, partition), (low, high) in ends.items()
                    if high > done.get((topic, partition), low)
                ]
                if not ranges:
                    stop.wait(IDLE_POLL_S)
                for offsets in ranges:
                    score_range(plan, io, offsets, TaskResources())
                    done[(offsets.topic, offsets.partition)] = offsets.until_offset
        except BaseException as exc:  # noqa: BLE001 -- handed to the caller of stop
            failure.append(exc)

    thread = threading.Thread(target=loop, name="ceiling", daemon=True)
    thread.start()

    def stop_loop() -> None:
        stop.set()
        thread.join()
        probe.close()
        if failure:
            raise failure[0]

    return stop_loop


def peer_query(spark, bootstrap: str, input_topic: str, output_topic: str, checkpoint: str, model, max_offsets: int):
    """Spark's Kafka source -> from_json -> predict_batch_udf (ONNX Runtime) -> to_json -> Spark's Kafka sink."""
    from pyspark.ml.functions import predict_batch_udf
    from pyspark.sql import functions as F
    from pyspark.sql.types import (
        ArrayType,
        DoubleType,
        FloatType,
        StructField,
        StructType,
    )

    spec = model.manifest.inputs[0]
    model_path = str(model.path)

    def make_predict_fn():
        import numpy as np
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])

        def predict(inputs: np.ndarray) -> np.ndarray:
            return session.run(None, {spec.name: inputs.astype(np.float32)})[0]

        return predict

    scores = predict_batch_udf(
        make_predict_fn, return_type=ArrayType(FloatType()), batch_size=BATCH_SIZE, input_tensor_shapes=[[spec.width]]
    )
    labels = F.array(*[F.lit(label) for label in model.manifest.labels])
    event = F.from_json(F.col("value").cast("string"), StructType([StructField(f, DoubleType()) for f in spec.features]))
    stream = (
        spark.readStream.format("kafka")
        .option("kafka.bootstrap.servers", bootstrap)
        .option("subscribe", input_topic)
        .option("startingOffsets", "earliest")
        .option("maxOffsetsPerTrigger", str(max_offsets))
        .load()
    )
    scored = stream.select("key", "topic", "partition", "offset", "timestamp", event.alias("e")).select(
        "key", "topic", "partition", "offset", "timestamp",
        scores(F.array(*[F.col(f"e.{f}").cast("float") for f in spec.features])).alias("scores"),
    )
    value = F.to_json(F.struct(
        F.col("key").cast("string").alias("key"),
        F.struct(
            F.element_at(labels, F.array_position(F.col("scores"), F.array_max("scores")).cast("int")).alias("label"),
            F.map_from_arrays(labels, F.col("scores")).alias("scores"),
        ).alias("prediction"),
        F.struct("topic", "partition", "offset", F.unix_millis("timestamp").alias("timestamp_ms")).alias("source"),
        F.concat_ws("/", "topic", "partition", "offset").alias("idempotency_key"),
    ))
    return (
        scored.select("key", value.alias("value"))
        .writeStream.format("kafka")
        .option("kafka.bootstrap.servers", bootstrap)
        .option("topic", output_topic)
        .option("checkpointLocation", checkpoint)
        .start()
    )


def wait_until(condition: Callable[[], bool], seconds: float, what: str) -> None:
    """Poll ``condition`` until it holds; exit the benchmark naming ``what`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"deadline: {what} not reached within {seconds} s")
        time.sleep(0.2)


def throughput(start: Starter, bootstrap: str, name: str, args: argparse.Namespace, reader_settings: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Phase 1 for ``name``: the backlog in topic ``events`` through ``start``'s query. ``reader_settings``:
    client settings of the output reader (``isolation.level``...)."""
    output = f"{name}-backlog"
    ensure_topics(client_for(bootstrap), {output: PARTITIONS, f"{output}-dlq": 1})
    reader = OutputReader(client_for(bootstrap, reader_settings), (output,), track=True, group=f"bench-{name}")
    reader.start()
    started = time.monotonic()
    stop = start("events", output, "backlog")
    try:
        wait_until(lambda: reader.distinct >= args.events, args.deadline_seconds, f"{name}: {args.events} predictions")
    finally:
        stop()
        reader.stop()
    return {
        "cold_start_s": round(reader.first_at - started, 2),
        "steady_events_per_s": reader.steady_rate(),
        "overall_events_per_s": round(args.events / (reader.last_at - started), 1),
        "missing": reader.missing(topic_ends(client_for(bootstrap), "events")),
        "duplicates": reader.duplicates,
    }


def latency(start: Starter, bootstrap: str, name: str, manifest, args: argparse.Namespace, reader_settings: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Phase 2 for ``name``: events produced live into an empty topic while ``start``'s query runs."""
    source, output = f"{name}-live", f"{name}-live-out"
    ensure_topics(client_for(bootstrap), {source: PARTITIONS, output: PARTITIONS, f"{output}-dlq": 1})
    reader = OutputReader(client_for(bootstrap, reader_settings), (output,), track=True, group=f"bench-live-{name}")
    reader.start()
    stop = start(source, output, "live")
    warm_up = LoadGenerator(client_for(bootstrap), source, manifest, seed=6)
    live = LoadGenerator(client_for(bootstrap, {"linger.ms": "1"}), source, manifest, seed=7)
    count = int(args.latency_rate * args.latency_seconds)
    try:
        warm_up.run(100, None, threading.Event())
        wait_until(lambda: reader.distinct >= 100, args.deadline_seconds, f"{name}: warm-up predictions")
        warm = reader.distinct
        live.run(count, args.latency_rate, threading.Event())
        wait_until(lambda: reader.distinct >= warm + count, args.deadline_seconds, f"{name}: live predictions")
    finally:
        stop()
        warm_up.close()
        live.close()
        reader.stop()
    return {"latency_events": count, "latency_duplicates": reader.duplicates, **latency_summary(reader.latency_ms(since=warm))}


if __name__ == "__main__":
    main()
