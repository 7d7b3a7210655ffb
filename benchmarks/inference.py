"""Inference-stage throughput: streamhydro vs predict_batch_udf vs pandas_udf + ORT vs bare ORT.

Runs on the driver of one local Spark session (``local[N]``), once per invocation::

    python benchmarks/inference.py [--rows 200000] [--heavy-rows 100000] [--batch-size 4096] [--cores 2]

Every contestant gets the same Kafka-shaped input (a cached DataFrame whose ``value`` holds JSON objects
with 30 named features) and the same ONNX model, and ends with one JSON output value per row, written
to Spark's ``noop`` sink:

* ``streamhydro``: ``mapInArrow(score_batches(plan), OUTPUT_SCHEMA)`` (decode, ORT, encode in the engine,
  pipelined with ``--pipeline-depth``);
* ``streamhydro_sequential``: the same with pipelining off (``pipeline_depth=0``), the peer the
  pipelining is judged against (on a GPU the goal is pipelined >= 1.5x sequential);
* ``predict_batch_udf``: ``from_json`` -> ``array`` -> ``pyspark.ml.functions.predict_batch_udf`` (ORT
  inside) -> ``to_json``;
* ``pandas_udf``: ``from_json`` -> ``array`` -> a Series-to-Series ``pandas_udf`` calling ORT -> ``to_json``;
* ``bare_ort``: ``InferenceSession.run`` over the same feature matrices in ``--batch-size`` rows, no Spark,
  no decode or encode, with as many intra-op threads as Spark has cores;
* ``engine_no_spark`` (extra): streamhydro's engine over the same Arrow batches in this process, no Spark.

Spark contestants run one task per core with one ORT thread per task. Each is run once to warm up
(Python workers, session caches) and then ``--repeats`` times; the best run counts. Models: the demo
model from ``models/`` (the shipped ``breast_cancer`` when present, else a 30-64-2 MLP) and a
compute-heavy MLP from ``benchmarks/heavy_model.py``. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).parent))

from heavy_model import mlp  # noqa: E402
from streamhydro.config import PayloadSettings  # noqa: E402
from streamhydro.errors import ModelError  # noqa: E402
from streamhydro.executor.scoring import OUTPUT_SCHEMA, EngineSettings, ScoringPlan, score_batches, score_partition  # noqa: E402
from streamhydro.payload import HEADERS_TYPE  # noqa: E402
from streamhydro.registry import Manifest, Registry  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = "breast_cancer"


def demo_model() -> tuple[bytes, Manifest]:
    try:
        version = Registry(ROOT / "models").get(DEMO_MODEL)
        return version.read_bytes(), version.manifest
    except ModelError:
        return mlp("demo_mlp", 64, 1)


def kafka_table(manifest: Manifest, rows: int, seed: int = 0) -> tuple[pa.Table, np.ndarray]:
    """Kafka-source-shaped rows whose values are JSON objects of the model's features."""
    features = manifest.inputs[0].features
    matrix = np.random.default_rng(seed).normal(10, 5, size=(rows, len(features))).astype(np.float32)
    text = pa.array(
        ["{" + ",".join(f'"{name}":{value!r}' for name, value in zip(features, row.tolist())) + "}" for row in matrix]
    )
    table = pa.table(
        {
            "key": pa.array([f"user-{i % 9973}".encode() for i in range(rows)], pa.binary()),
            "value": text.cast(pa.binary()),
            "topic": pa.array(["events"] * rows),
            "partition": pa.array(np.arange(rows) % 3, pa.int32()),
            "offset": pa.array(np.arange(rows), pa.int64()),
            "timestamp": pa.array(np.full(rows, 1_767_225_600_000_000), pa.timestamp("us", tz="UTC")),
            "timestampType": pa.array(np.zeros(rows), pa.int32()),
            "headers": pa.array([[]] * rows, HEADERS_TYPE),
        }
    )
    return table, matrix


def ort_session(data: bytes, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])


def timed(run, repeats: int, rows: int) -> float:
    run()
    best = min(_seconds(run) for _ in range(repeats))
    return rows / best


def _seconds(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def peers(spark, frame, data: bytes, manifest: Manifest, batch_size: int):
    """predict_batch_udf and pandas_udf pipelines over the same frame: from_json -> model -> to_json."""
    from pyspark.ml.functions import predict_batch_udf
    from pyspark.sql import functions as F
    from pyspark.sql.types import ArrayType, DoubleType, FloatType, StructField, StructType

    features = manifest.inputs[0].features
    input_name = manifest.inputs[0].name
    schema = StructType([StructField(name, DoubleType()) for name in features])
    parsed = frame.select(
        "key", F.from_json(F.col("value").cast("string"), schema).alias("j")
    ).select("key", F.array(*[F.col("j")[name].cast("float") for name in features]).alias("x"))
    model_bytes = spark.sparkContext.broadcast(data)

    def make_predict_fn():
        session = ort_session(model_bytes.value, 1)

        def predict(x: np.ndarray) -> np.ndarray:
            return session.run(None, {input_name: x.astype(np.float32)})[0]

        return predict

    predict = predict_batch_udf(
        make_predict_fn, return_type=ArrayType(FloatType()), batch_size=batch_size, input_tensor_shapes=[[len(features)]]
    )
    cache: dict[str, object] = {}

    @F.pandas_udf(ArrayType(FloatType()))
    def pandas_predict(x: pd.Series) -> pd.Series:
        session = cache.get("session") or cache.setdefault("session", ort_session(model_bytes.value, 1))
        scores = session.run(None, {input_name: np.stack(x.to_numpy()).astype(np.float32)})[0]
        return pd.Series(list(scores))

    def output(scored):
        return scored.select(F.col("key"), F.to_json(F.struct(F.col("key").cast("string").alias("key"), F.col("p").alias("scores"))).alias("value"))

    return output(parsed.select("key", predict("x").alias("p"))), output(parsed.select("key", pandas_predict("x").alias("p")))


def bench_model(spark, label: str, data: bytes, manifest: Manifest, rows: int, args) -> dict[str, float]:
    table, matrix = kafka_table(manifest, rows)
    schema = "key binary, value binary, topic string, partition int, offset long, timestamp timestamp, timestampType int, headers array<struct<key:string,value:binary>>"
    frame = spark.createDataFrame(table.to_pandas(), schema).repartition(args.cores).cache()
    frame.count()
    plan = ScoringPlan(
        manifest,
        spark.sparkContext.broadcast(data),
        PayloadSettings(),
        "predictions",
        "dead",
        EngineSettings(batch_size=args.batch_size, pipeline_depth=args.pipeline_depth, intra_op_threads=1),
    )

    def noop(df):
        return lambda: df.write.format("noop").mode("overwrite").save()

    batch_udf_frame, pandas_frame = peers(spark, frame, data, manifest, args.batch_size)
    session = ort_session(data, args.cores)
    input_name = manifest.inputs[0].name
    batches = [matrix[i : i + args.batch_size] for i in range(0, rows, args.batch_size)]
    arrow_batches = table.to_batches(max_chunksize=20000)
    local_plan = ScoringPlan(manifest, SimpleNamespace(value=data), PayloadSettings(), "p", "d", plan.engine)
    sequential = dataclasses.replace(plan, engine=dataclasses.replace(plan.engine, pipeline_depth=0))
    result = {
        "streamhydro": timed(noop(frame.mapInArrow(score_batches(plan), OUTPUT_SCHEMA)), args.repeats, rows),
        "streamhydro_sequential": timed(noop(frame.mapInArrow(score_batches(sequential), OUTPUT_SCHEMA)), args.repeats, rows),
        "predict_batch_udf": timed(noop(batch_udf_frame), args.repeats, rows),
        "pandas_udf": timed(noop(pandas_frame), args.repeats, rows),
        "bare_ort": timed(lambda: [session.run(None, {input_name: b}) for b in batches], args.repeats, rows),
        "engine_no_spark": timed(lambda: list(score_partition(local_plan, iter(arrow_batches))), args.repeats, rows),
    }
    frame.unpersist()
    print(f"{label:<14}" + "".join(f"{value:>23,.0f}" for value in result.values()), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000, help="rows for the demo model (default 200000)")
    parser.add_argument("--heavy-rows", type=int, default=100_000, help="rows for the heavy model (default 100000)")
    parser.add_argument("--batch-size", type=int, default=4096, help="inference batch for every contestant")
    parser.add_argument("--pipeline-depth", type=int, default=2, help="streamhydro pipeline depth (0 = off)")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 2, help="Spark local[N] cores")
    parser.add_argument("--repeats", type=int, default=2, help="measured runs per contestant (best counts)")
    parser.add_argument("--hidden", type=int, default=1024, help="heavy model hidden width")
    parser.add_argument("--layers", type=int, default=3, help="heavy model hidden layers")
    args = parser.parse_args()
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from streamhydro.spark import Master, build_session

    spark = build_session(
        Master.parse(f"local[{args.cores}]"),
        "streamhydro-inference-benchmark",
        {"spark.ui.enabled": "false", "spark.sql.execution.arrow.maxRecordsPerBatch": "20000", "spark.python.worker.reuse": "true"},
    )
    spark.sparkContext.setLogLevel("ERROR")
    try:
        demo_bytes, demo_manifest = demo_model()
        heavy_bytes, heavy_manifest = mlp("heavy_mlp", args.hidden, args.layers, demo_manifest.inputs[0].features)
        names = ["streamhydro", "streamhydro_sequential", "predict_batch_udf", "pandas_udf", "bare_ort", "engine_no_spark"]
        print("rows/s " + " " * 7 + "".join(f"{name:>23}" for name in names))
        results = {
            "demo": bench_model(spark, f"demo({demo_manifest.name})", demo_bytes, demo_manifest, args.rows, args),
            "heavy": bench_model(spark, "heavy", heavy_bytes, heavy_manifest, args.heavy_rows, args),
        }
    finally:
        spark.stop()
    summary: dict[str, object] = {"cores": args.cores, "batch_size": args.batch_size, "pipeline_depth": args.pipeline_depth}
    for model, result in results.items():
        summary[model] = {f"{name}_rows_per_s": round(value) for name, value in result.items()}
        summary[model]["vs_bare_ort"] = round(result["streamhydro"] / result["bare_ort"], 3)
        summary[model]["vs_predict_batch_udf"] = round(result["streamhydro"] / result["predict_batch_udf"], 3)
        summary[model]["pipelined_vs_sequential"] = round(result["streamhydro"] / result["streamhydro_sequential"], 3)
        print(
            f"{model}: streamhydro = {summary[model]['vs_bare_ort']:.2f} x bare ORT, "
            f"{summary[model]['vs_predict_batch_udf']:.2f} x predict_batch_udf"
        )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
