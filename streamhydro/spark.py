"""Spark plumbing for ``serve``, ``demo`` and ``train``: what a master URL means, sessions, task profiles.

Runs on the driver: :func:`resolve_master` and :func:`build_session` once per process,
:func:`task_profile` once per query or training run. This is the one module that decides what
a master can do; everything else asks a :class:`Master`. pyspark is imported inside the
functions that need it, so the configuration can use :class:`Master` before Spark starts.

Three kinds of master:

* ``local``, ``local[N]``, ``local[N,F]``, ``local[*]`` -- one JVM, Python workers on this machine.
  Spark schedules no custom resources there: a job whose tasks ask for GPUs never starts, and
  stage-level task profiles are refused. GPUs are therefore refused with local masters.
* ``local-cluster[N,C,MB]`` -- a standalone master and N workers started by the driver on this
  machine (tests; it needs Spark's build layout or the pyspark package). Schedules GPUs and profiles.
* anything else (``spark://``, ``yarn``, ``k8s://``) -- a cluster; executors run elsewhere, so
  their Python interpreter and paths are the cluster's, not this process's.

An empty master means "the one spark-submit was given" and is resolved from the running JVM.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from streamhydro.devices import ORDER_VAR, PCI_ORDER
from streamhydro.errors import ConfigError
from streamhydro.internals import (
    CHECKPOINT_FILE_MANAGER,
    FILE_SYSTEM_CHECKPOINT_MANAGER,
    attach_to_submitted_jvm,
    started_by_spark_submit,
)

if TYPE_CHECKING:
    from pyspark.resource import ResourceProfile
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

LOCAL = "local"
LOCAL_CLUSTER = "local-cluster"
CLUSTER = "cluster"

_LOCAL = re.compile(r"^local(?:\[(\*|\d+)(?:,\s*(\d+))?\])?$")
_LOCAL_CLUSTER = re.compile(r"^local-cluster\[\s*\d+\s*,\s*\d+\s*,\s*\d+\s*\]$")

GPU = "gpu"
# How many GPUs each executor owns; Spark hands task slots out of these.
EXECUTOR_GPU_AMOUNT = "spark.executor.resource.gpu.amount"
# Script each executor runs to find its GPU addresses (prints {"name":"gpu","addresses":[...]}).
EXECUTOR_GPU_DISCOVERY = "spark.executor.resource.gpu.discoveryScript"
# GPUs per task for stages without a profile. streamhydro never sets it: stages ask through profiles.
TASK_GPU_AMOUNT = "spark.task.resource.gpu.amount"
# Standalone workers (and local-cluster) must announce their GPUs before executors can claim them.
WORKER_GPU_AMOUNT = "spark.worker.resource.gpu.amount"
WORKER_GPU_DISCOVERY = "spark.worker.resource.gpu.discoveryScript"
# Task profiles are refused while dynamic allocation is on; barrier stages refuse it too.
DYNAMIC_ALLOCATION = "spark.dynamicAllocation.enabled"
# CUDA numbers GPUs as nvidia-smi (and the discovery script) does only in PCI bus order; see streamhydro.devices.
EXECUTOR_DEVICE_ORDER = f"spark.executorEnv.{ORDER_VAR}"

# What every streaming session (serve, demo, the Kafka tests) gets unless the caller's conf overrides it.
STREAMING_CONF = {
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
    # No console progress bars: a daemon's output is its log, and the demo draws its own progress line.
    "spark.ui.showConsoleProgress": "false",
}


@dataclasses.dataclass(frozen=True)
class Master:
    """A Spark master URL and what it can do. Build with :meth:`parse` or :func:`resolve_master`."""

    url: str
    kind: str

    @classmethod
    def parse(cls, url: str) -> Master:
        if not url:
            raise ConfigError("spark.master", "is empty here", "name a master, or run through spark-submit (resolve_master)")
        if _LOCAL.match(url):
            return cls(url, LOCAL)
        if url.startswith(LOCAL_CLUSTER):
            if not _LOCAL_CLUSTER.match(url):
                raise ConfigError("spark.master", f"{url!r} is not local-cluster[WORKERS,CORES,MEMORY_MB]", "e.g. local-cluster[2,1,1024]")
            return cls(url, LOCAL_CLUSTER)
        if url.startswith("local"):
            raise ConfigError("spark.master", f"{url!r} is not a Spark master", "use local[N], local-cluster[N,C,MB], spark://HOST:PORT, yarn or k8s://URL")
        return cls(url, CLUSTER)

    @property
    def workers_here(self) -> bool:
        """Whether executors' Python workers run on this machine (they see its paths and interpreter)."""
        return self.kind != CLUSTER

    @property
    def schedules_resources(self) -> bool:
        """Whether Spark schedules GPUs and stage-level task profiles here (not in local mode)."""
        return self.kind != LOCAL

    def with_task_retries(self, attempts: int) -> Master:
        """local[N] allows no task retry; local[N,F] does. Other masters retry already and are returned as they are."""
        match = _LOCAL.match(self.url)
        if self.kind != LOCAL or match is None or match.group(2):
            return self
        return Master(f"local[{match.group(1) or 1},{max(2, attempts)}]", LOCAL)

    @property
    def retries_tasks(self) -> bool:
        match = _LOCAL.match(self.url)
        return self.kind != LOCAL or bool(match and match.group(2))


def resolve_master(url: str) -> Master:
    """The master to use: ``url``, or for an empty one the master spark-submit was given."""
    if url:
        return Master.parse(url)
    if not started_by_spark_submit():
        raise ConfigError(
            "spark.master", "is empty, which means spark-submit's --master, but this process was not started by spark-submit",
            "set spark.master in the config, or launch with deploy/serve/submit.sh or deploy/train/submit.sh",
        )
    from pyspark import SparkConf

    # The JVM spark-submit started holds the master in its conf.
    attach_to_submitted_jvm()
    return Master.parse(SparkConf().get("spark.master", ""))


def check_gpu_master(master: Master, gpus: float, key: str) -> None:
    """Refuse GPUs (``key`` = ``gpus``) on a master that cannot schedule them, for serve and train alike: under
    local[N] a job asking for GPUs never starts, and without the ask its tasks would get no GPU and run on
    the CPU, much slower than the configuration says."""
    if gpus and not master.schedules_resources:
        raise ConfigError(
            "spark.master",
            f"{master.url} does not schedule GPUs ({key} = {gpus}): Spark's local mode never starts a task "
            "that asks for one",
            "use a standalone cluster (deploy/standalone/), local-cluster[N,C,MB] on one machine, or set the GPU amounts to 0",
        )


def gpu_conf(master: Master, executor_gpus: int, discovery_script: str) -> dict[str, str]:
    """Application-level conf for GPU executors; tasks take their share through :func:`task_profile`.

    Standalone worker keys are included so that ``local-cluster`` and single-host standalone
    deployments announce their GPUs. No ``spark.task.resource.gpu.amount``: only stages that
    ask through a profile take GPUs.
    """
    check_gpu_master(master, executor_gpus, "spark.executor_gpus")
    if executor_gpus == 0:
        return {}
    return {
        EXECUTOR_GPU_AMOUNT: str(executor_gpus),
        EXECUTOR_GPU_DISCOVERY: discovery_script,
        WORKER_GPU_AMOUNT: str(executor_gpus),
        WORKER_GPU_DISCOVERY: discovery_script,
        DYNAMIC_ALLOCATION: "false",
        EXECUTOR_DEVICE_ORDER: PCI_ORDER,
    }


def build_session(master: Master, app_name: str, conf: Mapping[str, str]) -> SparkSession:
    """Create (or return the running) SparkSession on ``master`` with ``conf``.

    Where Python workers run on this machine they run this interpreter (unless $PYSPARK_PYTHON
    names one): outside an activated virtualenv the first ``python3`` on PATH has no pyspark or
    streamhydro. On a cluster set PYSPARK_PYTHON or ``spark.pyspark.python`` to the executors' one.
    A driver JVM this process starts maps the class archive ``streamhydro jars`` built
    (:mod:`streamhydro.classes`), which halves its start.
    """
    from pyspark.sql import SparkSession

    if master.workers_here:
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    if not started_by_spark_submit():  # spark-submit started the JVM already
        from streamhydro.classes import sharing_conf

        conf = {**conf, **sharing_conf(conf)}
    builder = SparkSession.builder.master(master.url).appName(app_name)
    for key, value in conf.items():
        builder = builder.config(key, value)
    return builder.getOrCreate()


def streaming_session(master: Master, app_name: str, conf: Mapping[str, str] | None = None) -> SparkSession:
    """A session with :data:`STREAMING_CONF` (``conf`` wins) and streamhydro's Kafka data source registered."""
    from streamhydro.kafka.source import KafkaDataSource

    session = build_session(master, app_name, {**STREAMING_CONF, **(conf or {})})
    session.dataSource.register(KafkaDataSource)
    return session


def checkpoint_conf(location: str) -> dict[str, str]:
    """The checkpoint file manager for a checkpoint on the local file system: Hadoop's FileSystem API.

    Spark's default (FileContext) takes 30-60 ms per metadata file on this 2-core machine, twice per
    micro-batch (offset log, commit log); the FileSystem-based manager 11-15 ms (``docs/performance.md``).
    Both write a temporary file and rename it; on a local file system the rename is POSIX ``rename``,
    atomic. What the FileSystem one lacks is an atomic "rename unless the target exists", which matters
    only when two drivers write one checkpoint at once, which Structured Streaming does not support with
    either manager. Other schemes (HDFS, object stores) keep Spark's choice.
    """
    scheme = urlparse(location).scheme
    if scheme not in ("", "file"):
        return {}
    return {CHECKPOINT_FILE_MANAGER: FILE_SYSTEM_CHECKPOINT_MANAGER}


def task_profile(master: Master, cpus: int, gpus: float) -> ResourceProfile | None:
    """A stage-level task profile asking ``cpus`` CPUs and ``gpus`` GPUs per task, or None for none.

    None when no GPU is asked for (the application's task resources apply) or when the master
    cannot schedule profiles (local mode; serve and train refuse GPUs there first, :func:`check_gpu_master`).
    """
    if cpus < 1:
        raise ConfigError("spark.task.cpus", f"must be at least 1, got {cpus}", "set it to 1 or more")
    if not gpus or not master.schedules_resources:
        return None
    from pyspark.resource import ResourceProfileBuilder, TaskResourceRequests

    return ResourceProfileBuilder().require(TaskResourceRequests().cpus(cpus).resource(GPU, gpus)).build


def task_cpus(spark: Any) -> int:
    """``spark.task.cpus`` of a running session."""
    return int(spark.sparkContext.getConf().get("spark.task.cpus", "1"))
