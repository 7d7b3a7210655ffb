"""Metrics of ``serve`` and ``demo``. Runs on the driver, for the life of the query.

Order of use (the Python workers must find a clean directory and the variable that points to it)::

    conf = {**user_conf, **executor_conf(config.metrics, master.url)}
    spark = streaming_session(master, app_name, conf)           # workers inherit the variable
    metrics = start_driver_metrics(spark, config.metrics)       # before the first Spark job
    print(metrics.url)
    ...                                                         # query runs; metrics.set_model(...)
    metrics.close()

One endpoint serves the driver's metrics (query progress, lag, model), the GPUs of this machine,
and -- where the Python workers run on this machine (``local[...]``, ``local-cluster[...]``) -- the
executor metrics merged from the multiprocess directory. On a cluster each worker node serves its
own directory with :mod:`streamhydro.metrics.exporter`.
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from streamhydro.config import MetricsSettings
from streamhydro.errors import ConfigError
from streamhydro.internals import prometheus_multiprocess_enabled
from streamhydro.metrics import multiprocess
from streamhydro.metrics.definitions import DriverMetricSet
from streamhydro.metrics.endpoint import Endpoint
from streamhydro.metrics.gpu import GpuCollector
from streamhydro.metrics.listener import MetricsListener, ProgressRecorder
from streamhydro.spark import Master

log = logging.getLogger(__name__)


class DriverMetrics:
    """The driver's metrics and their endpoint. ``url`` is None when metrics are disabled."""

    def __init__(self, spark: Any, settings: MetricsSettings) -> None:
        self.registry = CollectorRegistry()
        self.metrics = DriverMetricSet(self.registry)
        self.recorder = ProgressRecorder(self.metrics)
        self.url: str | None = None
        self._spark = spark
        self._listener: MetricsListener | None = None
        self._gpu: GpuCollector | None = None
        self._endpoint: Endpoint | None = None
        if not settings.enabled:
            log.info("metrics disabled (metrics.enabled = false)")
            return
        if prometheus_multiprocess_enabled():
            raise ConfigError(
                "metrics.multiprocess_dir",
                f"{multiprocess.ENV_VAR} is set in the driver's environment, so driver metrics would be counted twice",
                f"unset {multiprocess.ENV_VAR}; streamhydro sets it for the executors' Python workers itself",
            )
        master = spark.sparkContext.master
        directory = multiprocess.multiprocess_dir(settings, master)
        configured = spark.sparkContext.getConf().get(multiprocess.EXECUTOR_ENV_KEY)
        if configured != str(directory):
            log.warning(
                "executor metrics will be missing: the session was built without %s=%s (merge executor_conf() into its conf)",
                multiprocess.EXECUTOR_ENV_KEY, directory,
            )
        if Master.parse(master).workers_here:
            MultiProcessCollector(self.registry, path=str(multiprocess.clean(directory)))
        self._gpu = GpuCollector()
        self.registry.register(self._gpu)
        self._listener = MetricsListener(self.recorder)
        spark.streams.addListener(self._listener)
        try:
            self._endpoint = Endpoint(self.registry, settings.host, settings.port, settings.certfile, settings.keyfile)
        except BaseException:
            self.close()
            raise
        self.url = self._endpoint.url

    def set_model(self, name: str, version: int | str) -> None:
        """The model version now serving (call on start and on every switch)."""
        self.metrics.model.clear()
        self.metrics.model.labels(name, str(version)).set(1)

    def model_refused(self, name: str, version: int | str, reason: str) -> None:
        """A model version failed its checks and was not switched to."""
        self.metrics.model_refusals.labels(name, str(version)).inc()
        self.metrics.last_refusal.clear()
        self.metrics.last_refusal.labels(name, str(version), reason).set(1)

    def close(self) -> None:
        """Stop the endpoint, unregister the listener, release NVML. Idempotent."""
        if self._endpoint is not None:
            self._endpoint.close()
            self._endpoint = None
        if self._listener is not None:
            self._spark.streams.removeListener(self._listener)
            self._listener = None
        if self._gpu is not None:
            self._gpu.close()
            self._gpu = None


def start_driver_metrics(spark: Any, settings: MetricsSettings) -> DriverMetrics:
    """Clean the multiprocess directory, start the endpoint, listen to the session's queries.

    Call after the session is built (with :func:`~streamhydro.metrics.multiprocess.executor_conf`
    merged into its conf) and before its first job, so no worker has written yet.
    """
    return DriverMetrics(spark, settings)
