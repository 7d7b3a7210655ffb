"""The two ways ``serve`` reads and writes Kafka, one module each behind :class:`ServeConnector`; runs on the driver.

- :mod:`.builtin` (``kafka.source = "builtin"``): Spark's JVM Kafka source and sink around the scoring.
- :mod:`.python` (``kafka.source = "python"``): streamhydro's source plans offset ranges and each task reads,
  scores and writes its range in one Python worker; the only one that can write exactly once.

:class:`~streamhydro.driver.serve.Service` asks its connector, once each, for Spark settings (before the
session exists), start-time checks (with the session, before the query starts) and the input stream, then
hands it every micro-batch. :func:`connector_for` is the one place the setting picks a module.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from streamhydro.config import Config
from streamhydro.kafka.options import Connector


@dataclasses.dataclass(frozen=True)
class Batch:
    """One micro-batch as ``foreachBatch`` hands it over, with what scoring it needs.

    ``plan``: the :class:`~streamhydro.executor.scoring.ScoringPlan` the model follower picked at this batch's
    boundary; ``profile``: the scoring stage's Spark resource profile (None: the application's);
    ``query_id``: the streaming query's id, which waits until the query object exists.
    """

    frame: Any
    batch_id: int
    plan: Any
    profile: Any
    query_id: Callable[[], str]


class ServeConnector(abc.ABC):
    """What ``serve`` needs from a Kafka connector. Instances live on the driver for the life of the query."""

    described: str = ""  # for the log line that says the query started

    def __init__(self, config: Config) -> None:
        self.config = config

    def spark_conf(self, conf: Mapping[str, str]) -> dict[str, str]:
        """Spark settings the connector needs on top of ``conf`` (the user's ``spark.conf``), before the session starts."""
        return {}

    @abc.abstractmethod
    def check(self, spark: Any) -> None:
        """Refuse at start, with a :class:`~streamhydro.errors.ConfigError` naming the key and the fix, what this
        connector cannot serve with the session and the brokers as they are."""

    @abc.abstractmethod
    def stream(self, spark: Any) -> Any:
        """The input stream (``spark.readStream...load()``) whose micro-batches :meth:`process` gets."""

    @abc.abstractmethod
    def process(self, batch: Batch) -> int | None:
        """Score one micro-batch and write its predictions and dead letters; the input records it read when
        Spark cannot count them (None: Spark's own count holds)."""


def connector_for(config: Config) -> ServeConnector:
    """The connector ``kafka.source`` names."""
    if config.kafka.source == Connector.PYTHON:
        from streamhydro.driver.connectors.python import PythonConnector

        return PythonConnector(config)
    from streamhydro.driver.connectors.builtin import BuiltinConnector

    return BuiltinConnector(config)
