"""The Kafka sink: Spark's batch and streaming Arrow writers over one write implementation.

The writer objects are built on the driver (``DataSource.writer`` / ``streamWriter``, once per query or
write), validated there, and pickled to executors; ``write()`` runs in executor Python workers once per
task; ``commit()`` / ``abort()`` run on the driver once per job or micro-batch. Input columns are those of
Spark's Kafka sink: ``value`` (required), ``key``, ``topic`` (else the ``topic`` option), ``partition``,
``headers``.

Delivery is at least once (:mod:`streamhydro.kafka.writing`); exactly-once is ``streamhydro serve``'s
(``kafka.delivery``), which writes each input range in its own transaction (:mod:`streamhydro.kafka.transactions`).
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
from streamhydro.kafka.writing import produce_batches

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KafkaCommitMessage(WriterCommitMessage):
    """What one write task reports to the driver: how many records it delivered (all confirmed)."""

    rows: int


def _delivered(messages: list[WriterCommitMessage | None]) -> int:
    return sum(m.rows for m in messages if isinstance(m, KafkaCommitMessage))


class _ProducesToKafka:
    """The write both writers share: validated on the driver, run once per task on an executor."""

    def __init__(self, options: SinkOptions, schema: StructType) -> None:
        validate_sink_schema(schema, options.topic)
        self.options = options

    def write(self, iterator: Iterator[pa.RecordBatch]) -> KafkaCommitMessage:
        return KafkaCommitMessage(produce_batches(self.options.client, self.options.topic, iterator).rows)


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
    """``df.writeStream.format("streamhydro_kafka")``: every micro-batch's rows, at least once."""

    def commit(self, messages: list[WriterCommitMessage | None], batchId: int) -> None:
        log.info("Kafka micro-batch %d committed: %d records delivered", batchId, _delivered(messages))

    def abort(self, messages: list[WriterCommitMessage | None], batchId: int) -> None:
        log.warning(
            "Kafka micro-batch %d aborted after %d records were delivered (they stay in Kafka; the batch is retried)",
            batchId,
            _delivered(messages),
        )
