"""Structured Streaming progress -> driver metrics. Runs on the driver.

:class:`ProgressRecorder` is pure: it takes progress reports as the plain dicts of
``StreamingQueryProgress.json`` and sets the metrics of a :class:`DriverMetricSet` group, so tests
feed it dicts. :class:`MetricsListener` is the thin ``StreamingQueryListener`` shell Spark calls on
its listener-bus thread (through py4j) once per event: query started, progress (once per
micro-batch), idle (no new data), terminated.

Kafka lag comes from each progress' ``sources[]``, all ``{"topic": {"partition": offset}}``:
``latestOffset`` is the end of the partition when the batch was planned (streamhydro's source
reports true end offsets, right on the embedded broker too; Spark's JVM connector reports the
broker's) and ``startOffset`` what had been processed at that moment, so lag = latest - start is
exact for that instant. (latest - end, what was left after the batch, stays 0 whenever a batch
takes everything: it cannot see a service falling behind unless ``maxOffsetsPerTrigger`` binds.)
An idle event means no new data, so the query's lags drop to 0 then.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from pyspark.sql.streaming import StreamingQueryListener

from streamhydro.metrics.definitions import QUERY_STATES, DriverMetricSet

log = logging.getLogger(__name__)


def kafka_offsets(value: Any) -> dict[tuple[str, str], int]:
    """``{"topic": {"0": 12}}`` (a dict, or its JSON text) as ``{("topic", "0"): 12}``; {} for other offsets."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return {}
    if not isinstance(value, Mapping):
        return {}
    offsets = {}
    for topic, partitions in value.items():
        if not isinstance(partitions, Mapping):
            return {}
        for partition, offset in partitions.items():
            if not isinstance(offset, int) or isinstance(offset, bool):
                return {}
            offsets[(str(topic), str(partition))] = offset
    return offsets


def records_read(progress: Mapping[str, Any]) -> int:
    """Records a micro-batch read: from its Kafka offsets where every source has them (streamhydro's source
    gives Spark one row per range, so ``numInputRows`` counts ranges), else ``numInputRows``."""
    sources = progress.get("sources") or ()
    total = 0
    for source in sources:
        start, end = kafka_offsets(source.get("startOffset")), kafka_offsets(source.get("endOffset"))
        if not start or not end:
            return int(progress.get("numInputRows") or 0)
        total += sum(offset - start.get(tp, offset) for tp, offset in end.items())
    return total if sources else int(progress.get("numInputRows") or 0)


def kafka_lag(latest: Any, processed: Any) -> dict[tuple[str, str], int]:
    """Records not yet processed per (topic, partition); partitions with nothing processed count from 0."""
    latest_offsets = kafka_offsets(latest)
    processed_offsets = kafka_offsets(processed)
    return {key: max(0, offset - processed_offsets.get(key, 0)) for key, offset in latest_offsets.items()}


class ProgressRecorder:
    """Turns query events into metric values. Thread-safe: Spark calls it, scrapes read it."""

    def __init__(self, metrics: DriverMetricSet, clock: Callable[[], float] = time.monotonic) -> None:
        self._metrics = metrics
        self._clock = clock
        self._lock = threading.Lock()
        self._names: dict[str, str] = {}
        self._last_seen: dict[str, float] = {}
        self._partitions: dict[str, set[tuple[str, str]]] = {}
        self._ranges_read: dict[int, int] = {}

    def ranges_read(self, batch_id: int, records: int) -> None:
        """The records a micro-batch of streamhydro's source read, counted from its tasks' ranges by the
        driver. Its progress event then counts these: Spark reports no start offsets for a query's first
        micro-batch, and its ``numInputRows`` counts ranges, not records."""
        with self._lock:
            self._ranges_read[batch_id] = records

    def started(self, query_id: str, name: str | None) -> None:
        label = name or query_id
        with self._lock:
            self._names[query_id] = label
        self._set_state(label, "active")
        self._seen(label)

    def progress(self, progress: Mapping[str, Any]) -> None:
        """One micro-batch's progress, as the dict of ``StreamingQueryProgress.json``."""
        label = self._label(str(progress["id"]), progress.get("name"))
        m = self._metrics
        spark_rows = int(progress.get("numInputRows") or 0)
        with self._lock:
            counted = self._ranges_read.pop(progress.get("batchId"), None)
        rows = records_read(progress) if counted is None else counted
        # Spark's rates count its rows; scaled to records (they differ for streamhydro's source: a row is a range).
        scale = rows / spark_rows if spark_rows else 0.0
        m.batches.labels(label).inc()
        m.input_rows.labels(label).inc(rows)
        m.batch_rows.labels(label).observe(rows)
        m.input_rows_per_second.labels(label).set(_number(progress.get("inputRowsPerSecond")) * scale)
        m.processed_rows_per_second.labels(label).set(_number(progress.get("processedRowsPerSecond")) * scale)
        for phase, millis in (progress.get("durationMs") or {}).items():
            m.batch_duration.labels(label, phase).observe(millis / 1000.0)
        for source in progress.get("sources") or ():
            for (topic, partition), lag in kafka_lag(source.get("latestOffset"), source.get("startOffset")).items():
                m.kafka_lag.labels(label, topic, partition).set(lag)
                with self._lock:
                    self._partitions.setdefault(label, set()).add((topic, partition))
        self._set_state(label, "active")
        self._seen(label)

    def idle(self, query_id: str) -> None:
        label = self._label(query_id, None)
        with self._lock:
            partitions = sorted(self._partitions.get(label, ()))
        for topic, partition in partitions:
            self._metrics.kafka_lag.labels(label, topic, partition).set(0)
        self._set_state(label, "idle")
        self._seen(label)

    def terminated(self, query_id: str, exception: str | None) -> None:
        label = self._label(query_id, None)
        self._set_state(label, "failed" if exception else "stopped")
        if exception:
            log.error("streaming query %s failed: %s", label, exception)

    def _label(self, query_id: str, name: str | None) -> str:
        with self._lock:
            return self._names.setdefault(query_id, name or query_id)

    def _set_state(self, label: str, state: str) -> None:
        for candidate in QUERY_STATES:
            self._metrics.query_state.labels(label, candidate).set(1 if candidate == state else 0)

    def _seen(self, label: str) -> None:
        with self._lock:
            first = label not in self._last_seen
            self._last_seen[label] = self._clock()
        if first:
            self._metrics.last_progress_age.labels(label).set_function(lambda: self._age(label))

    def _age(self, label: str) -> float:
        with self._lock:
            return self._clock() - self._last_seen[label]


def _number(value: Any) -> float:
    """Spark writes NaN for rates of an empty batch's zero-length interval; report those as 0."""
    if value is None:
        return 0.0
    number = float(value)
    return 0.0 if number != number else number


class MetricsListener(StreamingQueryListener):
    """Feeds a :class:`ProgressRecorder`. Registered with ``spark.streams.addListener``; runs on the driver.

    Progress events, one per micro-batch, arrive as the progress' JSON text (:meth:`on_progress_json`):
    pyspark's ``QueryProgressEvent`` would cost a py4j call per field first (``benchmarks/metrics_cost.py``).
    """

    def __init__(self, recorder: ProgressRecorder) -> None:
        self._recorder = recorder
        self._java_listener: Any = None

    @property
    def _jlistener(self) -> Any:
        """What ``spark.streams.addListener`` / ``removeListener`` register (made once, in the driver)."""
        if self._java_listener is None:
            from streamhydro.internals import progress_as_json_listener

            self._java_listener = progress_as_json_listener(self, self.on_progress_json)
        return self._java_listener

    def on_progress_json(self, text: str) -> None:
        self._recorder.progress(json.loads(text))

    def onQueryStarted(self, event: Any) -> None:
        self._recorder.started(str(event.id), event.name)

    def onQueryProgress(self, event: Any) -> None:
        self._recorder.progress(json.loads(event.progress.json))

    def onQueryIdle(self, event: Any) -> None:
        self._recorder.idle(str(event.id))

    def onQueryTerminated(self, event: Any) -> None:
        self._recorder.terminated(str(event.id), event.exception)
