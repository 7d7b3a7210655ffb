"""End to end on Apache Kafka: ``serve`` as users run it, beside a tuned ``serve``, the pipeline users would
build instead, and what the machine's cores can do without Spark.

    python benchmarks/end_to_end.py [--events 400000] [--latency-rate 5000] [--latency-seconds 20] [--metrics-cost]

One Apache Kafka broker, the demo model and the same events (input topics with one partition per core, at
least 2). Contenders:

- ``serve_defaults_builtin``, ``serve_defaults_python``: ``python -m streamhydro serve --config FILE`` as a
  process of its own (:class:`streamhydro.harness.supervisor.ServeProcess`), with the README's minimal config and
  nothing else: bootstrap servers, input topic, output and dead-letter topics, model registry and name,
  checkpoint location, and ``kafka.source`` for the second. Everything else is the default: metrics on,
  ``inference.pipeline_depth = auto``, the default ``batch_size`` and ``max_offsets_per_trigger``, Spark's
  default master. The metrics endpoint binds a free port and its files go under the run's folder (where, not
  whether);
- ``serve_tuned_builtin``, ``serve_tuned_python``: the same, with :data:`TUNED` on top (what earlier versions
  of this benchmark ran: metrics off, micro-batches of at most ``--max-offsets-per-trigger``);
- ``peer``: Spark's JVM Kafka source -> ``from_json`` -> ``pyspark.ml.functions.predict_batch_udf`` (ONNX
  Runtime, the same model and batch size) -> ``to_json`` -> Spark's JVM Kafka sink, in this process, on a
  ``local[2]`` session of its own with serve's checkpoint setting: what a Spark user writes without
  streamhydro;
- ``ceiling``: no Spark: ``os.cpu_count()`` processes (spawned), process ``i`` owning the input partitions
  ``p`` with ``p % N == i``; each loops over its partitions' new offset ranges through the service's own task
  function (:func:`streamhydro.executor.direct.score_range`: consume -> decode -> ONNX Runtime -> encode ->
  produce, the same code), one ONNX Runtime thread each: what the machine's cores can do.

With ``--metrics-cost``, ``serve_defaults_<source>_metrics_off`` (the defaults with only
``metrics.enabled = false``) run too, and ``metrics_cost_<source>`` reports what metrics cost per event and
per micro-batch from the two steady rates (``benchmarks/metrics_cost.py`` times the metrics code alone).

Two phases per contender:

1. throughput: ``--events`` JSON events lie in the input topic before the contender starts; it works
   through them in micro-batches. A reader on the output topic takes the time as each batch of predictions
   arrives. Reported: ``cold_start_s`` (start -> first prediction; for serve, from the new process), 
   ``steady_events_per_s`` (predictions after the first 10 % / their arrival span), and ``missing``
   (events without a prediction: must be 0);
2. latency: the contender runs on an empty topic, then events are produced live at ``--latency-rate`` for
   ``--latency-seconds`` (``linger.ms=1``); latency = arrival of the prediction - the event's producer
   timestamp, p50 and p99.

Every wait has a deadline (``--deadline-seconds``) and ends early when serve exits. Prints a table to stderr
and, as its last line, one JSON object with every row and the ratios of each serve row to the peer, to the
ceiling, and (defaults) to the tuned row of the same connector.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from streamhydro.brokers import ApacheKafkaBroker
from streamhydro.config import KafkaSettings, PayloadSettings
from streamhydro.driver.demo import latency_summary
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
from streamhydro.harness.supervisor import ServeProcess, write_minimal_config

# One input partition per core: serve's tasks and the ceiling's processes each get work (at least 2).
PARTITIONS = max(2, os.cpu_count() or 2)
BATCH_SIZE = 4096
SOURCES = tuple(Connector)
IDLE_POLL_S = 0.005
STOP_TIMEOUT_S = 120.0


def tuned(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The tuned rows' settings on top of the defaults."""
    return {"kafka": {"max_offsets_per_trigger": args.max_offsets_per_trigger}, "metrics": {"enabled": False}}


METRICS_OFF = {"metrics": {"enabled": False}}


def arguments(doc: str, latency_rate: float, max_offsets: int) -> argparse.ArgumentParser:
    """The options every end-to-end benchmark takes (this one and ``delivery.py``)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=400_000)
    parser.add_argument("--latency-rate", type=float, default=latency_rate)
    parser.add_argument("--latency-seconds", type=float, default=20.0)
    parser.add_argument("--max-offsets-per-trigger", type=int, default=max_offsets,
                        help="micro-batch cap of the tuned rows and the peer (the defaults' rows keep serve's default)")
    parser.add_argument("--deadline-seconds", type=float, default=600.0)
    parser.add_argument("--registry", default="models")
    parser.add_argument("--model", default="breast_cancer")
    return parser


def backlog(bootstrap: str, manifest, events: int) -> None:
    """``events`` events in topic ``events`` (the throughput phase's input), before any contender starts."""
    ensure_topics(client_for(bootstrap), {"events": PARTITIONS})
    LoadGenerator(client_for(bootstrap), "events", manifest).run(events, None, threading.Event())


@dataclasses.dataclass
class Running:
    """A started contender: ``stop()`` stops it (raising what it failed with); ``failure()`` says why it
    ended on its own, None while it runs."""

    stop: Callable[[], None]
    failure: Callable[[], str | None] = lambda: None


Starter = Callable[[str, str, str], Running]


def main() -> None:
    parser = arguments(__doc__, latency_rate=5000.0, max_offsets=100_000)
    parser.add_argument("--metrics-cost", action="store_true", help="also run the defaults with metrics.enabled = false")
    parser.add_argument("--only", default="", help="comma-separated contenders to run, in this order (default: all)")
    args = parser.parse_args()
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

    model = Registry(args.registry).get(args.model, "promoted")
    rows: dict[str, dict[str, Any]] = {}
    with ApacheKafkaBroker() as broker, tempfile.TemporaryDirectory(prefix="streamhydro-bench-") as work:
        bootstrap = broker.bootstrap_servers
        backlog(bootstrap, model.manifest, args.events)
        contenders = starters(bootstrap, model, args, work)
        chosen = args.only.split(",") if args.only else list(contenders)
        unknown = set(chosen) - set(contenders)
        if unknown:
            raise SystemExit(f"--only: no contender {', '.join(sorted(unknown))}; they are {', '.join(contenders)}")
        for name in chosen:
            start = contenders[name]
            rows[name] = {
                **throughput(start, bootstrap, name, args),
                **latency(start, bootstrap, name, model.manifest, args),
            }
            print(f"{time.strftime('%H:%M:%S')} {name}: {json.dumps(rows[name])}", file=sys.stderr, flush=True)
    result: dict[str, Any] = {
        "events": args.events, "max_offsets_per_trigger_tuned_and_peer": args.max_offsets_per_trigger,
        "latency_rate_per_s": args.latency_rate, "cpus": os.cpu_count(), "partitions": PARTITIONS,
        "tuned": tuned(args), **rows,
    }
    result.update(ratios(rows))
    for source in SOURCES:
        on, off = rows.get(f"serve_defaults_{source}"), rows.get(f"serve_defaults_{source}_metrics_off")
        if on and off:
            result[f"metrics_cost_{source}"] = metrics_cost(on, off, backlog_micro_batch(args.events))
    for key, value in result.items():
        print(f"{key:>36}  {value}", file=sys.stderr)
    print(json.dumps(result))


def starters(bootstrap: str, model, args: argparse.Namespace, work: str) -> dict[str, Starter]:
    """Every contender, in the order they run: each serve process alone on the machine, the peer last (its
    Spark session lives in this process)."""
    contenders: dict[str, Starter] = {"ceiling": ceiling_starter(bootstrap, args)}
    for source in SOURCES:
        kafka = {"kafka": {"source": source}}
        contenders[f"serve_defaults_{source}"] = serve_starter(f"serve_defaults_{source}", bootstrap, args, work, kafka)
        contenders[f"serve_tuned_{source}"] = serve_starter(f"serve_tuned_{source}", bootstrap, args, work, kafka, tuned(args))
        if args.metrics_cost:
            name = f"serve_defaults_{source}_metrics_off"
            contenders[name] = serve_starter(name, bootstrap, args, work, kafka, METRICS_OFF)
    contenders["peer"] = peer_starter(bootstrap, model, args, work)
    return contenders


def ratio(mine: float | None, theirs: float | None) -> float | None:
    return round(mine / theirs, 3) if mine and theirs else None


def compared(mine: Mapping[str, Any], theirs: Mapping[str, Any]) -> dict[str, float | None]:
    """One row's throughput and latency as ratios to another's."""
    return {
        "steady_throughput": ratio(mine["steady_events_per_s"], theirs["steady_events_per_s"]),
        "latency_p50": ratio(mine["latency_p50_ms"], theirs["latency_p50_ms"]),
        "latency_p99": ratio(mine["latency_p99_ms"], theirs["latency_p99_ms"]),
    }


def ratios(rows: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Each serve row against the peer and the ceiling; the defaults against the tuned row of their connector."""
    result = {}
    for name, row in rows.items():
        if not name.startswith("serve_"):
            continue
        for other in ("peer", "ceiling"):
            if other in rows:
                result[f"{name}_vs_{other}"] = compared(row, rows[other])
        source = name.split("_")[2]
        if name == f"serve_defaults_{source}" and f"serve_tuned_{source}" in rows:
            result[f"{name}_vs_tuned"] = compared(row, rows[f"serve_tuned_{source}"])
    return result


def backlog_micro_batch(events: int) -> float:
    """Mean events per micro-batch of the defaults' rows in the backlog phase (serve's default cap)."""
    cap = KafkaSettings().max_offsets_per_trigger or events
    return events / math.ceil(events / cap)


def metrics_cost(on: Mapping[str, Any], off: Mapping[str, Any], events_per_batch: float) -> dict[str, float | None]:
    """What metrics cost, from the steady rates with them on and off (the difference of the inverse rates):
    per event, and per micro-batch of ``events_per_batch`` events; and the live phase's latency ratios."""
    rate_on, rate_off = on["steady_events_per_s"], off["steady_events_per_s"]
    per_event_s = 1 / rate_on - 1 / rate_off if rate_on and rate_off else None
    return {
        "steady_throughput_on_vs_off": ratio(rate_on, rate_off),
        "per_event_us": round(per_event_s * 1e6, 3) if per_event_s is not None else None,
        "per_micro_batch_ms": round(per_event_s * events_per_batch * 1e3, 1) if per_event_s is not None else None,
        "events_per_micro_batch": events_per_batch,
        "latency_p50_on_vs_off": ratio(on["latency_p50_ms"], off["latency_p50_ms"]),
        "latency_p99_on_vs_off": ratio(on["latency_p99_ms"], off["latency_p99_ms"]),
    }


def serve_starter(name: str, bootstrap: str, args: argparse.Namespace, work: str, *layers: Mapping[str, Mapping[str, Any]]) -> Starter:
    """A Starter of ``streamhydro serve --config FILE`` as a process of its own, with the README's minimal
    config (:func:`~streamhydro.harness.supervisor.write_minimal_config`) and ``layers`` on top."""

    def start(input_topic: str, output_topic: str, tag: str) -> Running:
        run = Path(work) / f"{name}-{tag}"
        run.mkdir(parents=True)
        config = write_minimal_config(run / "serve.toml", run, bootstrap, input_topic, output_topic, Path(args.registry) / args.model, *layers)
        serve = ServeProcess(config, run / "serve.log")
        serve.start()

        def failure() -> str | None:
            code = serve.poll()
            return None if code is None else f"serve exited with {code}: {serve.error_line() or 'no error printed'} (log {serve.log_path})"

        def stop() -> None:
            ended_before = failure()
            code = serve.terminate(STOP_TIMEOUT_S)
            if code is None:
                serve.kill()
                raise SystemExit(f"{name}: serve did not stop within {STOP_TIMEOUT_S:.0f} s of SIGTERM (log {serve.log_path})")
            if ended_before or code != 0:
                raise SystemExit(f"{name}: {ended_before or failure()}")

        return Running(stop, failure)

    return start


def ceiling_starter(bootstrap: str, args: argparse.Namespace) -> Starter:
    """A Starter of the no-Spark ceiling: ``os.cpu_count()`` spawned processes, each scoring its share of the
    partitions (:func:`ceiling_process`)."""
    processes = os.cpu_count() or 1
    context = multiprocessing.get_context("spawn")

    def start(input_topic: str, output_topic: str, tag: str) -> Running:
        stop_event = context.Event()
        errors = context.SimpleQueue()
        workers = [
            context.Process(
                target=ceiling_process, name=f"ceiling-{i}",
                args=(bootstrap, args.registry, args.model, input_topic, output_topic,
                      [p for p in range(PARTITIONS) if p % processes == i], args.max_offsets_per_trigger // PARTITIONS,
                      stop_event, errors),
            )
            for i in range(processes)
        ]
        for worker in workers:
            worker.start()

        def failure() -> str | None:
            ended = [w for w in workers if w.exitcode is not None]
            if not ended:
                return None
            return f"ceiling process {ended[0].name} exited with {ended[0].exitcode}: {errors.get() if not errors.empty() else 'no error sent'}"

        def stop() -> None:
            ended_before = failure()
            stop_event.set()
            for worker in workers:
                worker.join()
            if ended_before or any(w.exitcode for w in workers):
                raise SystemExit(f"ceiling: {ended_before or failure()}")

        return Running(stop, failure)

    return start


def ceiling_process(bootstrap: str, registry: str, model_name: str, input_topic: str, output_topic: str,
                    partitions: list[int], max_per_range: int, stop, errors) -> None:
    """One process of the ceiling (spawned; its arguments are picklable): loops over ``partitions``' new
    offset ranges, at most ``max_per_range`` records each, through :func:`score_range` until ``stop`` is set."""
    model = Registry(registry).get(model_name, "promoted")
    plan = ScoringPlan(
        model.manifest, SimpleNamespace(value=model.read_bytes()), PayloadSettings(), output_topic, f"{output_topic}-dlq",
        EngineSettings(providers=("CPUExecutionProvider",), batch_size=BATCH_SIZE, pipeline_depth=0, intra_op_threads=1),
    )
    io = RangeIO(client_for(bootstrap))
    probe = EndOffsetProbe(client_for(bootstrap))
    done: dict[tuple[str, int], int] = {}
    try:
        while not stop.is_set():
            ends = probe.list_offsets([(input_topic, p) for p in partitions])
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
    except BaseException as exc:  # noqa: BLE001 -- sent to the parent, then re-raised
        errors.put(f"{type(exc).__name__}: {exc}")
        raise
    finally:
        probe.close()


def peer_starter(bootstrap: str, model, args: argparse.Namespace, work: str) -> Starter:
    """A Starter of the peer's query, on a Spark session made for it in this process (stopped with the query)."""
    from streamhydro.driver.connectors.builtin import connector_conf
    from streamhydro.spark import Master, checkpoint_conf, streaming_session

    def start(input_topic: str, output_topic: str, tag: str) -> Running:
        conf = {"spark.ui.enabled": "false", **checkpoint_conf(tempfile.gettempdir()), **connector_conf({})}
        spark = streaming_session(Master.parse("local[2]"), "streamhydro-bench-peer", conf)
        query = peer_query(spark, bootstrap, input_topic, output_topic, f"{work}/peer-{tag}", model, args.max_offsets_per_trigger)

        def failure() -> str | None:
            return None if query.isActive else f"the peer's query ended: {query.exception()}"

        def stop() -> None:
            query.stop()
            spark.stop()

        return Running(stop, failure)

    return start


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


def wait_until(condition: Callable[[], bool], seconds: float, what: str, running: Running | None = None) -> None:
    """Poll ``condition`` until it holds; exit the benchmark naming ``what`` after ``seconds``, or as soon as
    ``running`` ended on its own."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"deadline: {what} not reached within {seconds} s")
        failed = running.failure() if running is not None else None
        if failed:
            raise SystemExit(f"{what}: {failed}")
        time.sleep(0.2)


def throughput(start: Starter, bootstrap: str, name: str, args: argparse.Namespace, reader_settings: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Phase 1 for ``name``: the backlog in topic ``events`` through ``start``'s query. ``reader_settings``:
    client settings of the output reader (``isolation.level``...)."""
    output = f"{name}-backlog"
    ensure_topics(client_for(bootstrap), {output: PARTITIONS, f"{output}-dlq": 1})
    reader = OutputReader(client_for(bootstrap, reader_settings), (output,), track=True, group=f"bench-{name}")
    reader.start()
    started = time.monotonic()
    running = start("events", output, "backlog")
    try:
        wait_until(lambda: reader.distinct >= args.events, args.deadline_seconds, f"{name}: {args.events} predictions", running)
    finally:
        running.stop()
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
    running = start(source, output, "live")
    warm_up = LoadGenerator(client_for(bootstrap), source, manifest, seed=6)
    live = LoadGenerator(client_for(bootstrap, {"linger.ms": "1"}), source, manifest, seed=7)
    count = int(args.latency_rate * args.latency_seconds)
    try:
        warm_up.run(100, None, threading.Event())
        wait_until(lambda: reader.distinct >= 100, args.deadline_seconds, f"{name}: warm-up predictions", running)
        warm = reader.distinct
        live.run(count, args.latency_rate, threading.Event())
        wait_until(lambda: reader.distinct >= warm + count, args.deadline_seconds, f"{name}: live predictions", running)
    finally:
        running.stop()
        warm_up.close()
        live.close()
        reader.stop()
    return {"latency_events": count, "latency_duplicates": reader.duplicates, **latency_summary(reader.latency_ms(since=warm))}


if __name__ == "__main__":
    main()
