"""Launching the barrier stage. Runs on the driver, once per ``train`` run.

Spark refuses or stalls a barrier stage in a few situations that are cheap to detect up front:
dynamic allocation (refused outright), fewer free task slots than ranks (Spark re-checks for
minutes before failing), a master that allows no task retry (the first rank failure fails the
job instead of retrying the stage). :func:`check_cluster` turns each into a :class:`ClusterError`
that says what to change, before anything is launched.

The stage is ``mapInArrow(barrier=True)`` followed by a one-partition exchange: Spark never
retries a failed barrier *result* stage ("Could not recover from a failed barrier ResultStage"),
but it does retry a barrier *shuffle map* stage as a whole, up to
``spark.stage.maxConsecutiveAttempts`` times. The retried ranks resume from the run's checkpoint.

The barrier job is the only job a run starts besides what the source needs for its schema (one
small job for Parquet; CSV with schema inference reads the file): the ranks compute the feature
statistics and check the labels together (:mod:`.rank.statistics`), so the rows are read once.
Nothing on the driver imports torch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

from pyspark.resource import ResourceProfile
from pyspark.sql import DataFrame, SparkSession

from streamhydro.devices import PCI_ORDER
from streamhydro.internals import max_concurrent_tasks
from streamhydro.registry import ModelVersion
from streamhydro.spark import (
    DYNAMIC_ALLOCATION,
    EXECUTOR_DEVICE_ORDER,
    Master,
    resolve_master,
    task_cpus,
    task_profile,
)
from streamhydro.trainer import data
from streamhydro.trainer.config import TrainConfig
from streamhydro.trainer.errors import ClusterError, DataError, TrainingError
from streamhydro.trainer.plan import MetricsPlan, RankPlan
from streamhydro.trainer.publish import publish
from streamhydro.trainer.rank.task import DATA_ERROR, RESULT_DDL, RankTask

log = logging.getLogger(__name__)

# Spark's default is 365 days: a rank stuck in barrier() would hold the cluster for a year.
BARRIER_SYNC_TIMEOUT = "spark.barrier.sync.timeout"
# How many times a failed barrier stage is run again (each retry resumes from the checkpoint).
STAGE_ATTEMPTS = "spark.stage.maxConsecutiveAttempts"
# Must be >= 2: at 1 the first failed rank aborts the job instead of failing the stage for a retry.
TASK_MAX_FAILURES = "spark.task.maxFailures"
# Spark's own "enough slots?" re-check; ours runs first, so Spark's need not wait minutes.
SLOTS_CHECK_INTERVAL = "spark.scheduler.barrier.maxConcurrentTasksCheck.interval"
SLOTS_CHECK_FAILURES = "spark.scheduler.barrier.maxConcurrentTasksCheck.maxFailures"


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What a run produced: the published version, rank 0's report, where the run's checkpoints lie,
    and where the ``train`` call's time went on the driver (:func:`train`)."""

    version: ModelVersion
    report: dict[str, Any]
    run_dir: Path
    timings: dict[str, float]


def session_settings(config: TrainConfig) -> tuple[Master, dict[str, str]]:
    """The master and Spark conf a trainer session is built with; the user's spark.conf wins.

    An empty ``spark.master`` is spark-submit's master. local[N] becomes local[N,F], so that a
    failed rank can be retried.
    """
    t = config.training
    conf = {
        BARRIER_SYNC_TIMEOUT: str(t.timeout_seconds),
        STAGE_ATTEMPTS: str(t.max_attempts),
        TASK_MAX_FAILURES: str(max(2, t.max_attempts)),
        SLOTS_CHECK_INTERVAL: "5s",
        SLOTS_CHECK_FAILURES: "2",
    }
    jars = data.jdbc_jars(config.data)
    if jars:
        conf["spark.jars"] = ",".join(jars)
    if config.spark.gpus_per_rank:
        conf[EXECUTOR_DEVICE_ORDER] = PCI_ORDER
    master = resolve_master(config.spark.master)
    retrying = master.with_task_retries(t.max_attempts)
    if retrying != master:
        log.info("spark.master %s allows no retry of a failed rank; using %s", master.url, retrying.url)
    return retrying, {**conf, **config.spark.conf}


def build_session(config: TrainConfig) -> SparkSession:
    """The trainer's own session (no Kafka data source; master from config or spark-submit)."""
    from streamhydro.spark import build_session as build

    master, conf = session_settings(config)
    return build(master, config.spark.app_name, conf)


def resource_profile(spark: SparkSession, config: TrainConfig) -> ResourceProfile | None:
    """A profile asking ``spark.gpus_per_rank`` GPUs per rank, or None (CPU). GPUs on a master that cannot
    schedule them (local mode, e.g. spark-submit's ``--master local[4]``) are refused, as ``serve`` refuses them."""
    master = Master.parse(spark.sparkContext.master)
    config.spark.check_master(master)
    return task_profile(master, task_cpus(spark), config.spark.gpus_per_rank)


def check_cluster(spark: SparkSession, config: TrainConfig, profile: ResourceProfile | None) -> int:
    """Refuse, with the fix, a cluster that cannot run ``training.ranks`` barrier tasks. Returns the slots."""
    ranks = config.training.ranks
    sc = spark.sparkContext
    if sc.getConf().get(DYNAMIC_ALLOCATION, "false").lower() == "true":
        raise ClusterError(
            DYNAMIC_ALLOCATION, "is true; Spark does not run barrier stages with dynamic allocation",
            f"set spark.conf.\"{DYNAMIC_ALLOCATION}\" = \"false\" in the trainer config (or --conf {DYNAMIC_ALLOCATION}=false)",
        )
    if not Master.parse(sc.master).retries_tasks or sc.getConf().get(TASK_MAX_FAILURES, "4") == "1":
        log.warning("master %s allows no task retry: a failed rank fails the run instead of resuming from its checkpoint", sc.master)
    deadline = time.monotonic() + config.training.slots_wait_seconds
    while True:
        slots = max_concurrent_tasks(spark, profile)
        if slots >= ranks or time.monotonic() >= deadline:
            break
        log.info("waiting for executors: %d task slots free, training.ranks = %d", slots, ranks)
        time.sleep(2)
    if slots < ranks:
        what = f"{config.spark.gpus_per_rank} GPU(s) and " if profile else ""
        raise ClusterError(
            "training.ranks",
            f"{ranks} ranks need {ranks} tasks running at once, each with {what}a core, but the cluster has {slots} such slots",
            f"lower training.ranks to {slots or 1}, or give the application more executors/cores "
            "(spark.executor.instances, spark.executor.cores; local[N] with N >= ranks)",
        )
    return slots


def train(spark: SparkSession, config: TrainConfig, command: str) -> TrainResult:
    """Read, launch the barrier stage, publish the model rank 0 returned. Blocks until done.

    ``TrainResult.timings``: ``prepare_seconds`` (start checks, reading the source's schema,
    planning), ``stage_seconds`` (the barrier job: the shuffle into ranks, task launch, Python
    workers, everything the ranks do, returning the model) and ``publish_seconds``; the report
    splits the ranks' part (:mod:`.rank.task`).
    """
    started = time.perf_counter()
    profile = resource_profile(spark, config)
    slots = check_cluster(spark, config, profile)
    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    run_dir = Path(config.training.checkpoint_dir).absolute() / run_id
    log.info("run %s: %d ranks on %d slots, data %s, checkpoints in %s", run_id, config.training.ranks, slots, config.source_description(), run_dir)

    prepared = data.prepare(data.read(spark, config.data), config.data, config.training.seed)
    t = config.training
    plan = RankPlan(
        run_id=run_id, features=config.data.features, label=config.data.label, labels=config.data.labels,
        hidden=config.model.hidden, epochs=t.epochs, batch_size=t.batch_size, learning_rate=t.learning_rate,
        seed=t.seed, checkpoint_dir=str(run_dir.parent), timeout_seconds=t.timeout_seconds, tolerance=t.tolerance,
        inject_failure=config.injected_failure,
        metrics=MetricsPlan(pushgateway=config.metrics.pushgateway, host=config.metrics.host, port=config.metrics.port),
    )
    stage = _partitioned(prepared, t.ranks, t.rebalance).mapInArrow(RankTask(plan), RESULT_DDL, barrier=True, profile=profile).repartition(1)
    launched = time.perf_counter()
    rows = _run_stage(spark, stage, run_id, run_dir)
    finished = time.perf_counter()
    if len(rows) != 1:
        raise TrainingError(f"expected one model from rank 0, got {len(rows)} rows; see the executor logs of run {run_id}")
    report = json.loads(rows[0]["report"])
    if DATA_ERROR in report:
        raise DataError(f"{config.data.format} source: {report[DATA_ERROR]}")
    log.info("%d training rows, %d held out", report["train_rows"], report["validation_rows"])
    version = publish(config, bytes(rows[0]["model"]), report, command, run_id)
    timings = {
        "prepare_seconds": round(launched - started, 4),
        "stage_seconds": round(finished - launched, 4),
        "publish_seconds": round(time.perf_counter() - finished, 4),
    }
    log.info(
        "published %s: validation accuracy %s; run %s took: prepare %.2f s, barrier stage %.2f s (rank 0: imports %.2f s, "
        "data %.2f s, rendezvous %.2f s, training %.2f s, export %.2f s), publish %.2f s",
        version.label, report["validation_accuracy"], run_id, timings["prepare_seconds"], timings["stage_seconds"],
        report["imports_seconds"], report["load_seconds"], report["rendezvous_seconds"], report["rank_seconds"],
        report["export_seconds"], timings["publish_seconds"],
    )
    return TrainResult(version, report, run_dir, timings)


def _partitioned(prepared: DataFrame, ranks: int, rebalance: bool) -> DataFrame:
    """One partition per rank: the source's own when asked and they fit, else an even shuffle."""
    if not rebalance:
        partitions = prepared.rdd.getNumPartitions()
        if partitions == ranks:
            return prepared
        log.info("training.rebalance is false, but the source has %d partitions for %d ranks; repartitioning", partitions, ranks)
    return prepared.repartition(ranks)


def _run_stage(spark: SparkSession, stage: Any, run_id: str, run_dir: Path) -> list[Any]:
    """Collect the stage's output (one row); on failure cancel what is left of the job."""
    from py4j.protocol import Py4JJavaError
    from pyspark.errors import PySparkException

    sc = spark.sparkContext
    tag = f"streamhydro-train-{run_id}"
    sc.addJobTag(tag)
    try:
        return stage.collect()
    except (Py4JJavaError, PySparkException) as exc:
        sc.cancelJobsWithTag(tag)
        first = next((line for line in str(exc).splitlines() if "Job aborted" in line or "Exception" in line), str(exc)[:300])
        raise TrainingError(
            f"the barrier stage of run {run_id} failed: {first.strip()}. Attempts and finished epochs are in {run_dir}; "
            f"raise training.max_attempts to retry more often, training.timeout_seconds if ranks timed out"
        ) from exc
    finally:
        sc.removeJobTag(tag)
