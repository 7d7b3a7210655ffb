"""streamhydro's Kafka data source on Spark's Python Data Source API: the streaming reader, which plans offset
ranges and gives Spark one row per range (:mod:`streamhydro.kafka.ranges`); ``serve``'s tasks read them.

Where things run:

- :class:`KafkaDataSource` is built on the driver from the query's options and pickled to Spark's Python
  processes; ``streamReader`` parses and validates options on the driver.
- :class:`KafkaStreamReader`'s offset methods (``initialOffset``, ``latestOffset``, ``partitions``,
  ``commit``, ...) run on the driver in one long-lived Python process per query, once per micro-batch;
  it holds the end-offset probe (:mod:`streamhydro.kafka.offsets`) for the query's life.
- ``read()`` runs in executor Python workers, once per topic-partition with new records in a micro-batch.
  The reader is pickled there fresh from ``streamReader`` (no probe, no client): ``read`` reads nothing and
  yields its range as one row.

Offsets in Spark's checkpoint look like Spark's Kafka source's: ``{"topic": {"0": 123, "1": 45}}``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence

import pyarrow as pa
from pyspark.sql.datasource import DataSource, DataSourceStreamReader, InputPartition
from pyspark.sql.streaming.datasource import ReadAllAvailable, ReadLimit, ReadMaxRows, SupportsTriggerAvailableNow
from pyspark.sql.types import StructType

from streamhydro.errors import ConfigError, KafkaConnectorError
from streamhydro.kafka.offsets import EndOffsetProbe
from streamhydro.kafka.options import (
    EARLIEST,
    LATEST,
    EndOffsets,
    SourceOptions,
    offsets_from_json,
    offsets_to_json,
    parse_source_options,
)
from streamhydro.kafka.planning import TopicPartitionKey, admit, cap, ranges, regressions
from streamhydro.kafka.reading import report_data_loss
from streamhydro.kafka.ranges import RANGE_SCHEMA, range_batch
from streamhydro.kafka.truncation import RECHECK_EVERY_S, Watermarks, recheck_s, settle

log = logging.getLogger(__name__)

FORMAT = "streamhydro_kafka"


class KafkaDataSource(DataSource):
    """``spark.readStream.format("streamhydro_kafka")``.

    Options as Spark's Kafka source (see :mod:`streamhydro.kafka.options`). The schema is fixed,
    :data:`~streamhydro.kafka.ranges.RANGE_SCHEMA`: one row per task, the offsets it is to read.
    """

    @classmethod
    def name(cls) -> str:
        return FORMAT

    def schema(self) -> StructType:
        parse_source_options(self.options)  # bad options are refused at load(), before the query starts
        return RANGE_SCHEMA

    def streamReader(self, schema: StructType) -> KafkaStreamReader:
        if schema != RANGE_SCHEMA:
            raise ConfigError(
                "schema", f"the Kafka source has a fixed schema, got {schema.simpleString()}", "do not call .schema()"
            )
        return KafkaStreamReader(parse_source_options(self.options))


class KafkaStreamReader(DataSourceStreamReader, SupportsTriggerAvailableNow):
    """Micro-batch reads of Kafka topic-partitions, with admission control and Trigger.AvailableNow."""

    def __init__(self, options: SourceOptions) -> None:
        self.options = options
        self._probe: EndOffsetProbe | None = None
        self._target: dict[TopicPartitionKey, int] | None = None
        self._latest: dict[TopicPartitionKey, int] | None = None
        self._mirrored: dict[TopicPartitionKey, int] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_probe": None}

    @property
    def probe(self) -> EndOffsetProbe:
        if self._probe is None:
            self._probe = EndOffsetProbe(self.options.client, use_fetch=self.options.end_offsets == EndOffsets.FETCH)
        return self._probe

    def _current(self) -> dict[TopicPartitionKey, tuple[int, int]]:
        """``{tp: (log start, end)}`` of the partitions the subscription names now."""
        return self.probe.offset_ranges(self.probe.topic_partitions(self.options.subscription))

    def initialOffset(self) -> dict:
        current = self._current()
        starting = self.options.starting
        if starting.kind == "earliest":
            return offsets_to_json({tp: lo for tp, (lo, _) in current.items()})
        if starting.kind == "latest":
            return offsets_to_json({tp: hi for tp, (_, hi) in current.items()})
        specific = dict(starting.specific)
        missing = sorted(set(current) - set(specific))
        unknown = sorted(set(specific) - set(current))
        if missing or unknown:
            raise ConfigError(
                "startingOffsets",
                f"JSON offsets must name exactly the subscribed partitions; missing {missing}, unknown {unknown}",
                "list every subscribed topic-partition (-2 earliest, -1 latest), or use earliest / latest",
            )
        resolved = {}
        for tp, (lo, hi) in current.items():
            wanted = specific[tp]
            resolved[tp] = lo if wanted == EARLIEST else hi if wanted == LATEST else wanted
        return offsets_to_json(resolved)

    def getDefaultReadLimit(self) -> ReadLimit:
        limit = self.options.max_offsets_per_trigger
        return ReadMaxRows(limit) if limit is not None else ReadAllAvailable()

    def prepareForTriggerAvailableNow(self) -> None:
        self._target = {tp: hi for tp, (_, hi) in self._current().items()}
        log.info("Trigger.AvailableNow: reading up to %s", offsets_to_json(self._target))

    def latestOffset(self, start: dict, limit: ReadLimit) -> dict:
        begin = offsets_from_json(start)
        self._mirror(begin)
        current = self._settled(begin, self._present(begin))
        self._latest = {tp: hi for tp, (_, hi) in current.items()}
        latest = cap(self._latest, self._target) if self._target is not None else dict(self._latest)
        vanished = sorted(tp for tp, (_, now) in regressions(begin, latest).items() if now is None)
        if vanished and self._target is None:
            report_data_loss(self.options.fail_on_data_loss, f"partitions {vanished} are gone")
        filled = {tp: begin.get(tp, current.get(tp, (end, end))[0]) for tp, end in latest.items()}
        max_rows = limit.max_rows if isinstance(limit, ReadMaxRows) else None
        return offsets_to_json(admit(filled, latest, max_rows))

    def _present(self, begin: dict[TopicPartitionKey, int]) -> dict[TopicPartitionKey, tuple[int, int]]:
        """:meth:`_current`, asked again for up to :func:`~streamhydro.kafka.truncation.recheck_s` while a
        partition the query reads is missing from the metadata (a topic's metadata fails for a moment during a
        leader election); what is still missing after that is reported as gone."""
        deadline = time.monotonic() + recheck_s(self.options.poll_timeout_ms)
        while True:
            current = self._current()
            missing = sorted(set(begin) - set(current))
            if not missing or self._target is not None or time.monotonic() >= deadline:
                return current
            log.info("partitions %s missing from the metadata; asking again", missing)
            time.sleep(RECHECK_EVERY_S)

    def _settled(
        self, begin: dict[TopicPartitionKey, int], current: dict[TopicPartitionKey, tuple[int, int]]
    ) -> dict[TopicPartitionKey, tuple[int, int]]:
        """``current``, with each partition that ends below the query's position asked again for up to
        :func:`~streamhydro.kafka.truncation.recheck_s` in all (a leader change lowers the end for a moment);
        what is still short after that is reported as loss by ``partitions``."""
        short = sorted(tp for tp, (_, hi) in current.items() if tp in begin and hi < begin[tp])
        if not short:
            return current
        settled = dict(current)
        deadline = time.monotonic() + recheck_s(self.options.poll_timeout_ms)
        for tp in short:
            marks, transient = settle(lambda tp=tp: self._ask(tp), begin[tp], max(0.0, deadline - time.monotonic()))
            if marks is not None:
                settled[tp] = (marks.low, marks.high)
            if transient:
                log.info("%s[%d] ended below offset %d for a moment; now at %d", tp[0], tp[1], begin[tp], marks.high)
            else:
                log.warning("%s[%d] still ends at %d, below offset %d, after re-checking", tp[0], tp[1], settled[tp][1], begin[tp])
        return settled

    def _ask(self, tp: TopicPartitionKey) -> Watermarks | None:
        try:
            low, high = self.probe.offset_ranges([tp])[tp]
        except KafkaConnectorError as exc:
            log.debug("%s[%d] offsets: %s", *tp, exc)
            return None
        return Watermarks(low, high)

    def reportLatestOffset(self) -> dict | None:
        """The true end offsets seen by the last ``latestOffset`` (lag = these - processed)."""
        return offsets_to_json(self._latest) if self._latest is not None else None

    def partitions(self, start: dict, end: dict) -> Sequence[InputPartition]:
        begin, until = offsets_from_json(start), offsets_from_json(end)
        for (topic, partition), (was, now) in regressions(begin, until).items():
            if now is not None:
                report_data_loss(
                    self.options.fail_on_data_loss,
                    f"{topic}[{partition}] offset went back from {was} to {now} (topic recreated or truncated)",
                )
        new = [tp for tp in until if tp not in begin]
        new_start = {tp: lo for tp, (lo, _) in self.probe.list_offsets(new).items()}
        return [InputPartition(r) for r in ranges(begin, until, new_start)]

    def read(self, partition: InputPartition) -> Iterator[pa.RecordBatch]:
        yield range_batch([partition.value])

    def commit(self, end: dict) -> None:
        self._mirror(offsets_from_json(end))

    def _mirror(self, processed: dict[TopicPartitionKey, int]) -> None:
        """Mirror processed offsets to ``kafka.group.id`` for lag tools, when they moved.

        Spark commits a batch's offsets only when it plans the next batch, so an idle query would leave
        the group one batch behind forever; the ``start`` of ``latestOffset`` is processed too (Spark
        reruns an unfinished batch before asking for a new end), so it is mirrored as well.
        """
        if self.options.group_id is None or processed == self._mirrored:
            return
        self.probe.commit(processed)
        self._mirrored = dict(processed)

    def stop(self) -> None:
        if self._probe is not None:
            self._probe.close()
            self._probe = None
