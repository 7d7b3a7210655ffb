"""Inference metrics from executor Python workers. Runs in executor Python workers, once per task
partition (the engine calls :func:`observe_batch` when a partition is done).

Workers are forked by PySpark's daemon and reused across tasks, and several run at once, so each
writes its own files with prometheus_client's multiprocess mode: the directory comes from
``PROMETHEUS_MULTIPROC_DIR``, which Spark sets in every worker from ``spark.executorEnv``
(:func:`streamhydro.metrics.multiprocess.executor_conf`). prometheus_client picks a file per
process id and starts new files after a fork, so a forked worker never writes into its parent's.
The metric objects are made on the first call in a process, not at import.

Without the variable (the engine run outside ``serve``/``demo``: benchmarks, GPU tests) there is
nobody to read the numbers, and nothing is recorded.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING

from streamhydro.metrics.multiprocess import ENV_VAR

if TYPE_CHECKING:
    from streamhydro.executor.engine import BatchStats
    from streamhydro.metrics.definitions import ExecutorMetricSet

log = logging.getLogger(__name__)

_lock = threading.Lock()
_state: dict[str, ExecutorMetricSet | None] = {}


def observe_batch(stats: BatchStats) -> None:
    """Record one task partition's :class:`~streamhydro.executor.engine.BatchStats`."""
    metrics = _process_metrics()
    if metrics is not None:
        record(metrics, stats)


def observe_delivery_wait(seconds: float) -> None:
    """Record how long a task waited for its records' delivery confirmations after handing over the last."""
    metrics = _process_metrics()
    if metrics is not None:
        metrics.delivery_wait.observe(seconds)


def record(metrics: ExecutorMetricSet, stats: BatchStats) -> None:
    """Put one partition's stats into a metric set (pure; tests pass a set on a fresh registry)."""
    device = stats.device
    for stage, seconds in stats.stage_seconds.items():
        metrics.stage_duration.labels(stage, device).observe(seconds)
    metrics.partition_duration.labels(device).observe(stats.wall_seconds)
    for size in stats.batch_sizes:
        metrics.batch_rows.labels(device).observe(size)
    for queue, mean in stats.queue_mean.items():
        metrics.queue_items.labels(queue).observe(mean)
    if stats.rows_scored:
        metrics.rows_scored.labels(stats.model, str(stats.version), device).inc(stats.rows_scored)
    metrics.partitions.labels(device).inc()
    if stats.requested_device != device:
        metrics.device_fallbacks.labels(stats.requested_device, device).inc()
        metrics.cpu_fallback_batches.labels(stats.requested_device, device).inc(len(stats.batch_sizes))
    for error_class, count in stats.dead_letters.items():
        metrics.dead_letters.labels(error_class).inc(count)


def _process_metrics() -> ExecutorMetricSet | None:
    """This process' metric set, made on first use; None when multiprocess mode is not configured."""
    with _lock:
        if "metrics" not in _state:
            _state["metrics"] = _create()
        return _state["metrics"]


def _create() -> ExecutorMetricSet | None:
    if not os.environ.get(ENV_VAR):
        log.debug("%s is not set: executor metrics are not recorded in this process", ENV_VAR)
        return None
    # On a cluster node nobody may have made it yet (the per-node exporter does, when it runs first).
    os.makedirs(os.environ[ENV_VAR], exist_ok=True)
    from streamhydro.internals import prometheus_multiprocess_enabled
    from streamhydro.metrics.definitions import ExecutorMetricSet

    if not prometheus_multiprocess_enabled():
        log.warning(
            "%s was set after prometheus_client was imported in process %d: executor metrics are not recorded",
            ENV_VAR, os.getpid(),
        )
        return None
    return ExecutorMetricSet(registry=None)
