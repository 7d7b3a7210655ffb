"""Building the SparkSession. Runs on the driver, once per process."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

from pyspark.sql import SparkSession

# Defaults every streamhydro session gets unless the caller's conf overrides them.
DEFAULT_CONF = {
    # Few shuffle partitions: the inference job has no shuffle, and 200 empty tasks cost seconds.
    "spark.sql.shuffle.partitions": "2",
    # Arrow batches of this many rows cross the JVM/Python boundary; larger amortises per-batch cost.
    "spark.sql.execution.arrow.maxRecordsPerBatch": "20000",
    # Python workers are reused across tasks, so per-worker caches (Kafka clients, ONNX sessions) survive.
    "spark.python.worker.reuse": "true",
    # With no new data Spark asks the source again after this delay; each ask is a broker round trip.
    "spark.sql.streaming.pollingDelay": "100ms",
    # Keep streaming metadata small for a daemon that runs for months.
    "spark.sql.streaming.minBatchesToRetain": "20",
    # Python workers fork from a daemon that has already imported ONNX Runtime, confluent-kafka and
    # streamhydro, so a new worker starts without paying for those imports (see executor/daemon.py).
    "spark.python.daemon.module": "streamhydro.executor.daemon",
}


def build_session(master: str, app_name: str, conf: Mapping[str, str] | None = None) -> SparkSession:
    """Create (or return the running) SparkSession and register streamhydro's Kafka data source."""
    use_this_python_for_local_workers(master)
    builder = SparkSession.builder.master(master).appName(app_name)
    for key, value in {**DEFAULT_CONF, **(conf or {})}.items():
        builder = builder.config(key, value)
    session = builder.getOrCreate()
    from streamhydro.kafka.source import KafkaDataSource

    session.dataSource.register(KafkaDataSource)
    return session


def use_this_python_for_local_workers(master: str) -> None:
    """Make Python workers on this machine run this interpreter, unless $PYSPARK_PYTHON names one.

    PySpark starts its workers with $PYSPARK_PYTHON, else with the first ``python3`` on PATH: outside
    an activated virtualenv that is an interpreter without pyspark or streamhydro. This applies only
    to masters whose executors run here (``local``, ``local[...]``, ``local-cluster[...]``) and must
    run before the SparkContext starts. On a cluster, set PYSPARK_PYTHON or ``spark.pyspark.python``
    to the executors' interpreter instead.
    """
    if master == "local" or master.startswith(("local[", "local-cluster[")):
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
