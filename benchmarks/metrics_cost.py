"""What serve's metrics cost, timed on their own: per task partition, per micro-batch and per event.

    python benchmarks/metrics_cost.py [--repeats 2000] [--events-per-batch 200000] [--tasks 2] [--no-spark]

Three parts of the metrics path run once per micro-batch (nothing runs per event):

- ``executor_record_us``: :func:`streamhydro.metrics.executor.record` of one task partition's
  :class:`~streamhydro.executor.engine.BatchStats` (``events_per_batch / tasks`` rows in batches of the
  default ``inference.batch_size``), in prometheus_client's multiprocess mode as in serve's Python workers
  (a spawned process with ``PROMETHEUS_MULTIPROC_DIR`` set), plus ``observe_delivery_wait``;
- ``driver_progress_us``: :meth:`streamhydro.metrics.listener.ProgressRecorder.progress` of one progress
  report (two partitions' offsets), with the ``json.loads`` of its text;
- ``listener_event_us`` (Spark, local[2], a rate source; skipped with ``--no-spark``): what pyspark does
  with a progress event before :class:`~streamhydro.metrics.listener.MetricsListener` sees it
  (``QueryProgressEvent.fromJObject``, a py4j call per field) plus the listener's ``progress.json``;
  against ``listener_json_us``, one py4j call for the progress' JSON text alone.

``per_micro_batch_us`` = executor x tasks + driver + ``listener_json_us`` (what serve's listener does);
``per_event_us`` = that / events per batch; ``per_micro_batch_us_with_pyspark_event``: the same with
``listener_event_us``, what a listener on pyspark's event objects costs.
Prints a table to stderr and, as its last line, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from streamhydro.config import InferenceSettings

PROGRESS = {
    "id": "8a3f5a0e-6b1c-4a44-9d8e-8b5d8d1d2a11", "runId": "0b8d1d2a-11aa-4a44-9d8e-8b5d8d1d2a11", "name": "streamhydro",
    "timestamp": "2026-12-06T04:00:00.000Z", "batchId": 12, "batchDuration": 2800, "numInputRows": 200000,
    "inputRowsPerSecond": 71000.0, "processedRowsPerSecond": 71400.0,
    "durationMs": {"addBatch": 2700, "commitOffsets": 20, "getBatch": 0, "latestOffset": 8, "queryPlanning": 10,
                   "triggerExecution": 2800, "walCommit": 22},
    "stateOperators": [],
    "sources": [{"description": "KafkaV2[Subscribe[events]]", "startOffset": {"events": {"0": 100000, "1": 100000}},
                 "endOffset": {"events": {"0": 200000, "1": 200000}}, "latestOffset": {"events": {"0": 200000, "1": 200000}},
                 "numInputRows": 200000, "inputRowsPerSecond": 71000.0, "processedRowsPerSecond": 71400.0,
                 "metrics": {"avgOffsetsBehindLatest": "0.0", "maxOffsetsBehindLatest": "0", "minOffsetsBehindLatest": "0"}}],
    "sink": {"description": "ForeachBatchSink", "numOutputRows": -1},
}


def timed(call: Callable[[], Any], repeats: int) -> float:
    """Median microseconds of ``call`` over ``repeats`` calls, in 10 rounds."""
    rounds = []
    per_round = max(1, repeats // 10)
    for _ in range(10):
        started = time.perf_counter()
        for _ in range(per_round):
            call()
        rounds.append((time.perf_counter() - started) / per_round * 1e6)
    return round(statistics.median(rounds), 2)


def executor_part(rows: int, repeats: int, directory: str, out) -> None:
    """In a spawned process with PROMETHEUS_MULTIPROC_DIR set (as serve's Python workers): time record()."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    from streamhydro.executor.engine import QUEUES, STAGES, BatchStats
    from streamhydro.metrics import executor

    batch = InferenceSettings().batch_size
    sizes = (batch,) * (rows // batch) + ((rows % batch,) if rows % batch else ())
    stats = BatchStats(
        model="breast_cancer", version=1, partition_id=0, requested_device="cpu", device="cpu",
        providers=("CPUExecutionProvider",), rows_in=rows, rows_scored=rows, dead_letters={},
        stage_seconds={stage: 0.01 for stage in STAGES}, batch_sizes=sizes, pipeline_depth=0,
        queue_mean={queue: 0.0 for queue in QUEUES}, queue_max={queue: 0 for queue in QUEUES}, wall_seconds=1.2,
    )
    executor.observe_batch(stats)  # the first call makes the metric set and its files
    out.put({
        "executor_record_us": timed(lambda: executor.observe_batch(stats), repeats),
        "executor_delivery_wait_us": timed(lambda: executor.observe_delivery_wait(0.01), repeats),
        "inference_batches_per_task": len(sizes),
    })


def driver_part(repeats: int) -> dict[str, float]:
    from prometheus_client import CollectorRegistry

    from streamhydro.metrics.definitions import DriverMetricSet
    from streamhydro.metrics.listener import ProgressRecorder

    recorder = ProgressRecorder(DriverMetricSet(CollectorRegistry()))
    text = json.dumps(PROGRESS)
    recorder.progress(json.loads(text))
    return {"driver_progress_us": timed(lambda: recorder.progress(json.loads(text)), repeats)}


def listener_part(repeats: int) -> dict[str, float]:
    """Time pyspark's conversion of a real Java progress object against fetching its JSON text alone."""
    from pyspark.sql.streaming.listener import QueryProgressEvent

    from streamhydro.spark import Master, streaming_session

    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    spark = streaming_session(Master.parse("local[2]"), "streamhydro-metrics-cost", {"spark.ui.enabled": "false"})
    try:
        query = spark.readStream.format("rate").option("rowsPerSecond", 1000).load().writeStream.format("noop").start()
        deadline = time.monotonic() + 60
        while query.lastProgress is None or query.lastProgress["numInputRows"] == 0:
            if time.monotonic() > deadline:
                raise SystemExit("no progress from the rate query within 60 s")
            time.sleep(0.2)
        jevent = spark._jvm.org.apache.spark.sql.streaming.StreamingQueryListener.QueryProgressEvent(query._jsq.lastProgress())
        query.stop()

        def pyspark_path() -> None:
            json.loads(QueryProgressEvent.fromJObject(jevent).progress.json)

        def json_only() -> None:
            json.loads(jevent.progress().json())

        return {"listener_event_us": timed(pyspark_path, repeats // 10), "listener_json_us": timed(json_only, repeats // 10)}
    finally:
        spark.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2000)
    parser.add_argument("--events-per-batch", type=int, default=200_000)
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--no-spark", action="store_true")
    args = parser.parse_args()
    result: dict[str, Any] = {"events_per_batch": args.events_per_batch, "tasks": args.tasks}
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="streamhydro-metrics-cost-") as directory:
        out = context.SimpleQueue()
        worker = context.Process(target=executor_part, args=(args.events_per_batch // args.tasks, args.repeats, directory, out))
        worker.start()
        worker.join()
        if worker.exitcode:
            raise SystemExit(f"the executor part exited with {worker.exitcode}")
        result.update(out.get())
    result.update(driver_part(args.repeats))
    if not args.no_spark:
        result.update(listener_part(args.repeats))
    per_batch = (result["executor_record_us"] + result["executor_delivery_wait_us"]) * args.tasks + result["driver_progress_us"]
    result["per_micro_batch_us"] = round(per_batch + result.get("listener_json_us", 0.0), 1)
    result["per_event_us"] = round(result["per_micro_batch_us"] / args.events_per_batch, 4)
    if "listener_event_us" in result:
        result["per_micro_batch_us_with_pyspark_event"] = round(per_batch + result["listener_event_us"], 1)
    for key, value in result.items():
        print(f"{key:>28}  {value}", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
