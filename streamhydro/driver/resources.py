"""GPU resources for the inference stage: application-level conf and the stage-level ResourceProfile.

Runs on the driver: :func:`gpu_conf` once, when the SparkSession is built; :func:`inference_profile`
once per query start (the profile is passed to every ``mapInArrow(..., profile=...)``).

The inference stage asks for its GPUs through a stage-level ``TaskResourceProfile``, so other stages
of the same application (the Kafka source, the sink) do not hold GPUs. Executors must still be
started with GPUs (``spark.executor.resource.gpu.*``); a task profile only changes what each task of
the stage takes from them. Stage-level task profiles need a cluster manager (standalone,
``local-cluster``, YARN, Kubernetes) and dynamic allocation off; ``local[*]`` refuses them, and
there the application-level ``spark.task.resource.gpu.amount`` applies to every stage instead.
"""

from __future__ import annotations

import logging

from pyspark.resource import ResourceProfile, ResourceProfileBuilder, TaskResourceRequests
from pyspark.sql import SparkSession

from streamhydro.config import check_gpu_amounts
from streamhydro.errors import ConfigError

log = logging.getLogger(__name__)

GPU = "gpu"
# How many GPUs each executor owns; Spark hands task slots out of these.
EXECUTOR_GPU_AMOUNT = "spark.executor.resource.gpu.amount"
# Script each executor runs to find its GPU addresses (prints {"name":"gpu","addresses":[...]}).
EXECUTOR_GPU_DISCOVERY = "spark.executor.resource.gpu.discoveryScript"
# GPUs per task for stages without a profile; the only way to give tasks GPUs under local[*].
TASK_GPU_AMOUNT = "spark.task.resource.gpu.amount"
# Standalone workers (and local-cluster) must announce their GPUs before executors can claim them.
WORKER_GPU_AMOUNT = "spark.worker.resource.gpu.amount"
WORKER_GPU_DISCOVERY = "spark.worker.resource.gpu.discoveryScript"
# Task profiles are refused while dynamic allocation is on.
DYNAMIC_ALLOCATION = "spark.dynamicAllocation.enabled"


def supports_task_profiles(master: str) -> bool:
    """Whether the master can schedule stage-level task resource profiles."""
    return not (master == "local" or master.startswith("local["))


def gpu_conf(executor_gpus: int, task_gpus: float, discovery_script: str, master: str = "") -> dict[str, str]:
    """Application-level Spark conf for GPU executors.

    Where the master supports task profiles, tasks get GPUs only through :func:`inference_profile`,
    so ``spark.task.resource.gpu.amount`` is left out; under ``local[*]`` (no profiles) it is set,
    and every stage's tasks then take ``task_gpus``. Standalone worker keys are included so that
    ``local-cluster`` and single-host standalone deployments announce their GPUs.
    """
    check_gpu_amounts(executor_gpus, task_gpus)
    if executor_gpus == 0:
        return {}
    conf = {
        EXECUTOR_GPU_AMOUNT: str(executor_gpus),
        EXECUTOR_GPU_DISCOVERY: discovery_script,
        WORKER_GPU_AMOUNT: str(executor_gpus),
        WORKER_GPU_DISCOVERY: discovery_script,
        DYNAMIC_ALLOCATION: "false",
    }
    if not supports_task_profiles(master):
        conf[TASK_GPU_AMOUNT] = _amount(task_gpus)
    return conf


def inference_profile(spark: SparkSession, gpu_per_task: float, cpus_per_task: int) -> ResourceProfile | None:
    """The ResourceProfile for the inference ``mapInArrow``, or None to use the application's resources.

    None (with a log line saying why) when no GPU is asked for, or when the master cannot do task
    resource profiles (``local[*]``): tasks then run with the application-level resources.
    """
    check_gpu_amounts(1, gpu_per_task)
    if cpus_per_task < 1:
        raise ConfigError("spark.task.cpus", f"must be at least 1, got {cpus_per_task}", "set it to 1 or more")
    master = spark.sparkContext.master
    if gpu_per_task == 0:
        log.info("inference stage: no GPU requested, running with the application's default task resources")
        return None
    if not supports_task_profiles(master):
        log.warning(
            "inference stage: master %s cannot schedule stage-level task resource profiles; falling back to "
            "application-level resources (%s=%s, spark.task.cpus), which apply to every stage",
            master,
            TASK_GPU_AMOUNT,
            spark.sparkContext.getConf().get(TASK_GPU_AMOUNT, "unset"),
        )
        return None
    requests = TaskResourceRequests().cpus(cpus_per_task).resource(GPU, gpu_per_task)
    profile = ResourceProfileBuilder().require(requests).build
    log.info(
        "inference stage: task resource profile %s with %s GPU and %d CPU per task", profile.id, gpu_per_task, cpus_per_task
    )
    return profile


def _amount(value: float) -> str:
    return str(int(value)) if value == int(value) else str(value)
