"""PySpark's Python worker daemon, with streamhydro's heavy imports done once, before workers fork.

Runs on every executor host (in local mode, beside the driver): Spark starts it once per kind of
Python worker when ``spark.python.daemon.module`` names this module, which
:data:`streamhydro.spark.STREAMING_CONF` sets. Every Python worker is forked from the
daemon, so a module imported here is already loaded in each new worker. Without it, every fresh
worker imports ONNX Runtime, confluent-kafka, pyarrow's JSON reader and streamhydro itself, which
is paid again in the first micro-batch of each query and whenever Spark starts more workers.

Only imports happen here: no Kafka client, ONNX Runtime session or thread is created before the
fork (they would not survive it; see :mod:`streamhydro.kafka.clients`). The daemon refuses to start with
library versions streamhydro's wrappers of their internals were not verified with
(:func:`streamhydro.internals.check_versions`).
"""

import confluent_kafka  # noqa: F401 -- loaded once, inherited by forked workers
import onnxruntime  # noqa: F401
import pyarrow.json  # noqa: F401

import streamhydro.executor.scoring  # noqa: F401
import streamhydro.kafka.source  # noqa: F401
import streamhydro.payload.formats.json  # noqa: F401 -- the default format; the others load fastavro / protobuf on first use
from streamhydro.internals import check_versions, run_python_daemon

if __name__ == "__main__":
    check_versions()
    run_python_daemon()
