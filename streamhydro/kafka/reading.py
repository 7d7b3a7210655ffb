"""Reading one offset range of one topic-partition into Arrow batches.

Runs in executor Python workers, once per Spark task (one task per topic-partition with new records in
a micro-batch), with the worker's cached consumer.

Reads exactly ``[from, until)``. Offsets may have gaps (compaction, transaction markers): a record past
the gap, or the end-of-partition event, ends the wait, so a gap never hangs the task. Records that are
gone are data loss: the range starts below the log start, or the partition ends below ``until``
(truncated). With ``failOnDataLoss`` (the default) that raises :class:`DataLossError`; otherwise one
warning names ``topic[partition]`` and the lost offsets, and the rest is read.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import pyarrow as pa
from confluent_kafka import Consumer, KafkaError as ClientError, TopicPartition

from streamhydro.errors import DataLossError, KafkaError
from streamhydro.kafka.options import ClientConfig
from streamhydro.kafka.planning import OffsetRange
from streamhydro.kafka.records import columns_of, to_record_batch

log = logging.getLogger(__name__)

BATCH_ROWS = 20_000
_POLL_S = 0.5

# Readers fetch a partition range and stop: no commits, end-of-partition events on, errors not hidden.
READER_CONSUMER_DEFAULTS = {
    "group.id": "streamhydro-reader",
    "enable.auto.commit": "false",
    "enable.auto.offset.store": "false",
    "allow.auto.create.topics": "false",
    "isolation.level": "read_uncommitted",
}
READER_CONSUMER_FORCED = {
    "enable.partition.eof": "true",
    "auto.offset.reset": "error",
}


def reader_config(client: ClientConfig) -> ClientConfig:
    """The executor consumer's configuration: the user's ``kafka.*`` settings over reader defaults."""
    return ClientConfig.of({**client.with_defaults(READER_CONSUMER_DEFAULTS).as_dict(), **READER_CONSUMER_FORCED})


def report_data_loss(fail: bool, message: str) -> None:
    """The one place the source decides what data loss does: raise, or log one warning and go on."""
    if fail:
        raise DataLossError(f"{message}. Fix: if losing these records is acceptable, set failOnDataLoss=false")
    log.warning("data loss (failOnDataLoss=false): %s", message)


def read_range(
    consumer: Consumer,
    offsets: OffsetRange,
    fail_on_data_loss: bool,
    poll_timeout_ms: int,
    batch_rows: int = BATCH_ROWS,
) -> Iterator[pa.RecordBatch]:
    """Yield the records of ``offsets`` as RecordBatches of at most ``batch_rows`` rows."""
    topic, partition = offsets.topic, offsets.partition
    where = f"{topic}[{partition}]"
    start, until = offsets.from_offset, offsets.until_offset
    low, _ = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=poll_timeout_ms / 1000)
    if start < low:
        report_data_loss(fail_on_data_loss, f"{where} offsets {start}..{min(low, until) - 1} are gone (log starts at {low})")
        start = low
    if start >= until:
        return
    consumer.assign([TopicPartition(topic, partition, start)])
    try:
        pending: list = []
        position = start
        last_progress = time.monotonic()
        while position < until:
            wanted = min(until - position, batch_rows - len(pending))
            messages = consumer.consume(num_messages=wanted, timeout=_POLL_S)
            if messages:
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress > poll_timeout_ms / 1000:
                raise KafkaError(
                    f"{where}: no records for {poll_timeout_ms} ms while reading offsets {position}..{until - 1}. "
                    "Fix: check the broker, or raise kafkaConsumer.pollTimeoutMs"
                )
            for message in messages:
                error = message.error()
                if error is None:
                    if message.offset() >= until:
                        position = until
                        break
                    pending.append(message)
                    position = message.offset() + 1
                elif error.code() == ClientError._PARTITION_EOF:
                    if message.offset() < until:
                        report_data_loss(
                            fail_on_data_loss,
                            f"{where} ends at {message.offset()}, offsets {message.offset()}..{until - 1} are gone",
                        )
                    position = until
                    break
                elif error.code() == ClientError._AUTO_OFFSET_RESET:
                    low, _ = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=poll_timeout_ms / 1000)
                    if low <= position:
                        raise KafkaError(f"{where}: offset {position} out of range: {error.str()}")
                    report_data_loss(fail_on_data_loss, f"{where} offsets {position}..{min(low, until) - 1} are gone (log starts at {low})")
                    position = low
                    consumer.assign([TopicPartition(topic, partition, position)])
                    break
                else:
                    raise KafkaError(f"{where}: reading offset {position}: {error.str()}")
            if len(pending) >= batch_rows or (pending and position >= until):
                yield to_record_batch(columns_of(pending, topic, partition))
                pending = []
    finally:
        consumer.unassign()
