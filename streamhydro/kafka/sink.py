"""The Kafka sink: Spark's batch and streaming Arrow writers over one write implementation.

The writer objects are built on the driver (``DataSource.writer`` / ``streamWriter``, once per query or
write), validated there, and pickled to executors; ``write()`` runs in executor Python workers once per
task; ``commit()`` / ``abort()`` run on the driver once per job or micro-batch. Input columns are those of
Spark's Kafka sink: ``value`` (required), ``key``, ``topic`` (else the ``topic`` option), ``partition``,
``headers``.

Option ``delivery``: ``at_least_once`` (default; :mod:`streamhydro.kafka.writing`) or ``exactly_once``
(:mod:`streamhydro.kafka.transactions`: one transaction per task, with options ``transactionalIdPrefix`` and
``endOffsets``, and the origin columns ``source_topic``, ``source_partition``, ``source_end`` that
:func:`~streamhydro.kafka.transactions.with_origin` adds).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
from pyspark.sql.datasource import DataSourceArrowWriter, DataSourceStreamArrowWriter, WriterCommitMessage
from pyspark.sql.types import StructType

from streamhydro.errors import ConfigError
from streamhydro.kafka.options import SinkOptions
from streamhydro.kafka.records import validate_sink_schema
from streamhydro.kafka.transactions import ORIGIN_FIELDS, produce_exactly_once
from streamhydro.kafka.writing import produce_batches

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KafkaCommitMessage(WriterCommitMessage):
    """What one write task reports to the driver: how many records it delivered (all confirmed; with
    exactly-once, committed, and 0 for a range an earlier attempt had written)."""

    rows: int


def _delivered(messages: list[WriterCommitMessage | None]) -> int:
    return sum(m.rows for m in messages if isinstance(m, KafkaCommitMessage))


class _ProducesToKafka:
    """The write both writers share: validated on the driver, run once per task on an executor."""

    def __init__(self, options: SinkOptions, schema: StructType) -> None:
        validate_sink_schema(schema, options.topic)
        if options.exactly_once:
            _validate_origin_columns(schema)
        self.options = options

    def write(self, iterator: Iterator[pa.RecordBatch]) -> KafkaCommitMessage:
        o = self.options
        if o.exactly_once:
            ends = dict(o.end_offsets)
            return KafkaCommitMessage(produce_exactly_once(o.client, o.topic, iterator, o.transactional_id_prefix, ends, o.batch_id))
        return KafkaCommitMessage(produce_batches(o.client, o.topic, iterator).rows)


def _validate_origin_columns(schema: StructType) -> None:
    present = {f.name.lower(): f.dataType for f in schema.fields}
    missing = [f"{f.name} {f.dataType.simpleString()}" for f in ORIGIN_FIELDS.fields if present.get(f.name) != f.dataType]
    if missing:
        raise ConfigError(
            "delivery",
            f"exactly_once needs each row's input origin, and the DataFrame lacks {missing}",
            "score with mapInArrow(with_origin(func), <schema> + ', ' + ORIGIN_COLUMNS) from "
            "streamhydro.kafka.transactions, on streamhydro's source with no shuffle in between",
        )


class KafkaArrowWriter(_ProducesToKafka, DataSourceArrowWriter):
    """``df.write.format("streamhydro_kafka")``: append only (a Kafka topic cannot be overwritten)."""

    def __init__(self, options: SinkOptions, schema: StructType, overwrite: bool) -> None:
        if overwrite:
            raise ConfigError("mode", "overwrite is not possible on a Kafka topic", 'use mode("append")')
        super().__init__(options, schema)

    def commit(self, messages: list[WriterCommitMessage | None]) -> None:
        log.info("Kafka write committed: %d records delivered by %d tasks", _delivered(messages), len(messages))

    def abort(self, messages: list[WriterCommitMessage | None]) -> None:
        log.warning("Kafka write aborted after %d records were delivered (they stay in Kafka)", _delivered(messages))


class KafkaStreamArrowWriter(_ProducesToKafka, DataSourceStreamArrowWriter):
    """``df.writeStream.format("streamhydro_kafka")``: every micro-batch's rows, at least once, or exactly once
    with ``delivery=exactly_once``."""

    def commit(self, messages: list[WriterCommitMessage | None], batchId: int) -> None:
        log.info("Kafka micro-batch %d committed: %d records delivered", batchId, _delivered(messages))

    def abort(self, messages: list[WriterCommitMessage | None], batchId: int) -> None:
        log.warning(
            "Kafka micro-batch %d aborted after %d records were delivered (they stay in Kafka; the batch is retried)",
            batchId,
            _delivered(messages),
        )
