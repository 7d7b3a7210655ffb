"""Run by tests/test_resources.py in its own process: a local-cluster with two fake GPUs.

Only one SparkContext can live in a process and the test session already holds a local[2] one, so
this check starts its own local-cluster here and prints its findings as one JSON line on stdout.

Each inference task holds its partition for a moment (so tasks of a stage overlap), scores a few
records through the real engine asking for the CUDA provider, and reports its GPU addresses, the
device the engine requested and the device ONNX Runtime actually used.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).parent))

from _inference_models import Holder, feature_spec, json_values, kafka_batch, softmax_model  # noqa: E402
from streamhydro.driver.resources import gpu_conf, inference_profile  # noqa: E402
from streamhydro.driver.session import use_this_python_for_local_workers  # noqa: E402
from streamhydro.executor.scoring import EngineSettings, ScoringPlan, score_partition  # noqa: E402

HOLD_S = 3.0
RESULT_SCHEMA = "partition int, addresses string, requested string, device string, rows int, start double, stop double"


def probe(plan: ScoringPlan):
    def run(batches):
        from pyspark.taskcontext import TaskContext

        start = time.time()
        stats = []
        rows = sum(b.num_rows for b in score_partition(plan, batches, stats.append))
        time.sleep(HOLD_S)
        context = TaskContext.get()
        gpu = context.resources().get("gpu")
        yield pa.RecordBatch.from_pylist(
            [
                {
                    "partition": context.partitionId(),
                    "addresses": ",".join(gpu.addresses) if gpu else "",
                    "requested": stats[0].requested_device if stats else "",
                    "device": stats[0].device if stats else "",
                    "rows": rows,
                    "start": start,
                    "stop": time.time(),
                }
            ],
            schema=pa.schema(
                [("partition", pa.int32()), ("addresses", pa.string()), ("requested", pa.string()), ("device", pa.string()),
                 ("rows", pa.int32()), ("start", pa.float64()), ("stop", pa.float64())]
            ),
        )

    return run


def main() -> None:
    os.environ["SPARK_LOCAL_IP"] = "127.0.0.1"
    from pyspark.sql import SparkSession

    workdir = Path(tempfile.mkdtemp(prefix="fake-gpus-"))
    script = workdir / "gpus.sh"
    script.write_text('#!/usr/bin/env bash\necho \'{"name":"gpu","addresses":["0","1"]}\'\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    master = "local-cluster[1,4,1024]"
    use_this_python_for_local_workers(master)
    builder = SparkSession.builder.master(master).appName("fake-gpu-check")
    for key, value in {
        **gpu_conf(2, 0.5, str(script), master),
        "spark.ui.enabled": "false",
        "spark.executorEnv.PYTHONPATH": os.pathsep.join(sys.path),
    }.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    try:
        data, manifest = softmax_model([feature_spec("x", 4)])
        plan = ScoringPlan(
            manifest,
            Holder(data),
            "json",
            "o",
            "d",
            EngineSettings(providers=("CUDAExecutionProvider", "CPUExecutionProvider"), batch_size=8),
        )
        values = json_values(manifest, np.ones((40, 4)))
        frame = spark.createDataFrame(kafka_batch(values).to_pandas())
        results = {}
        for amount in (1.0, 0.5):
            profile = inference_profile(spark, amount, 1)
            rows = frame.repartition(4).mapInArrow(probe(plan), RESULT_SCHEMA, profile=profile).collect()
            results[str(amount)] = [row.asDict() for row in rows]
        plain = frame.repartition(2).mapInArrow(probe(plan), RESULT_SCHEMA).collect()
        results["no_profile"] = [row.asDict() for row in plain]
        print(json.dumps(results))
    finally:
        spark.stop()


if __name__ == "__main__":
    main()
