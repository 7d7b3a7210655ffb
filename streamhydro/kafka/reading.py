"""Reading one offset range of one topic-partition into Arrow batches.

Runs in executor Python workers, once per Spark task (one task per topic-partition with new records in
a micro-batch), with the worker's cached consumer.

Reads exactly ``[from, until)``. Offsets may have gaps (compaction, transaction markers): a record past
the gap, or the end-of-partition event, ends the wait, so a gap never hangs the task. Records that are
gone are data loss: the range starts below the log start, or the partition ends below ``until`` and
still does after a bounded re-check (:mod:`streamhydro.kafka.truncation`: a leader change can lower
the end for a moment). With ``failOnDataLoss`` (the default) that raises :class:`DataLossError`; otherwise one
warning names ``topic[partition]`` and the lost offsets, and the rest is read.
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_left
from collections.abc import Iterator

import pyarrow as pa
from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka import KafkaError as ClientError

from streamhydro.errors import DataLossError, KafkaConnectorError
from streamhydro.kafka.options import ClientConfig
from streamhydro.kafka.planning import OffsetRange
from streamhydro.kafka.records import columns_of, to_record_batch
from streamhydro.kafka.truncation import Watermarks, recheck_s, settle

log = logging.getLogger(__name__)

BATCH_ROWS = 20_000
_POLL_S = 0.5
_ASK_TIMEOUT_S = 5.0

# Readers fetch a partition range and stop: no commits, end-of-partition events on, errors not hidden.
READER_CONSUMER_DEFAULTS = {
    "group.id": "streamhydro-reader",
    "enable.auto.commit": "false",
    "enable.auto.offset.store": "false",
    "allow.auto.create.topics": "false",
    "isolation.level": "read_uncommitted",
    # Ranges are read only once they exist, so the broker never needs to hold a fetch open; a long wait
    # (librdkafka's default 500 ms) delays the next task's requests queued behind that fetch.
    "fetch.wait.max.ms": "10",
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


def _handle_event(
    consumer: Consumer, event, position: int, offsets: OffsetRange, fail_on_data_loss: bool, poll_timeout_ms: int
) -> int:
    """Act on a consumer event (not a record) while reading ``offsets``; returns the new read position."""
    where = f"{offsets.topic}[{offsets.partition}]"
    until = offsets.until_offset
    error = event.error()
    tp = TopicPartition(offsets.topic, offsets.partition)
    if error.code() == ClientError._PARTITION_EOF:
        if event.offset() < until:
            # A read_committed reader's end is the last stable offset, and librdkafka's cached high watermark
            # stays the high watermark: records up to ``until`` exist and an open transaction holds them
            # back. They come when it ends (the read's timeout bounds the wait); that is not loss.
            _, high = consumer.get_watermark_offsets(tp, cached=True)
            if high >= until:
                log.info("%s: offsets %d..%d wait for an open transaction to end", where, event.offset(), until - 1)
                return position
            wait_s = recheck_s(poll_timeout_ms)
            marks, transient = settle(lambda: _watermarks(consumer, tp), until, wait_s)
            if transient:
                log.info("%s ended at %d, below %d, for a moment (now %s); reading on", where, event.offset(), until, marks)
                return position
            end = marks.high if marks is not None else event.offset()
            report_data_loss(
                fail_on_data_loss, f"{where} ends at {end}, offsets {end}..{until - 1} are gone (still after {wait_s:.0f} s)"
            )
        return until
    if error.code() == ClientError._AUTO_OFFSET_RESET:
        marks = _watermarks(consumer, tp)
        if marks is not None and marks.low > position:
            report_data_loss(
                fail_on_data_loss,
                f"{where} offsets {position}..{min(marks.low, until) - 1} are gone (log starts at {marks.low})",
            )
            consumer.assign([TopicPartition(offsets.topic, offsets.partition, marks.low)])
            return marks.low
        # Past the end: a new leader behind the old one, for a moment, or the log was truncated.
        wait_s = recheck_s(poll_timeout_ms)
        marks, transient = settle(lambda: _watermarks(consumer, tp), position, wait_s)
        if marks is None:
            raise KafkaConnectorError(f"{where}: offset {position} out of range and no offsets from the broker: {error.str()}")
        if transient:
            log.info("%s ended below %d for a moment (now %s); reading on", where, position, marks)
            consumer.assign([TopicPartition(offsets.topic, offsets.partition, position)])
            return position
        report_data_loss(
            fail_on_data_loss,
            f"{where} ends at {marks.high}, offsets {marks.high}..{until - 1} are gone (still after {wait_s:.0f} s)",
        )
        return until
    raise KafkaConnectorError(f"{where}: reading offset {position}: {error.str()}")


def _watermarks(consumer: Consumer, tp: TopicPartition) -> Watermarks | None:
    """The partition's log start and end as the leader says now; None when it does not answer."""
    try:
        answer = consumer.get_watermark_offsets(tp, timeout=_ASK_TIMEOUT_S, cached=False)
    except KafkaException as exc:
        log.debug("%s[%d] offsets: %s", tp.topic, tp.partition, exc)
        return None
    return None if answer is None else Watermarks(int(answer[0]), int(answer[1]))


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
        report_data_loss(
            fail_on_data_loss, f"{where} offsets {start}..{min(low, until) - 1} are gone (log starts at {low})"
        )
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
                raise KafkaConnectorError(
                    f"{where}: no records for {poll_timeout_ms} ms while reading offsets {position}..{until - 1}. "
                    "Fix: check the broker, or raise kafkaConsumer.pollTimeoutMs"
                )
            events = [m for m in messages if m.error() is not None]
            data = [m for m in messages if m.error() is None] if events else messages
            if data:
                data_offsets = [m.offset() for m in data]
                cut = bisect_left(data_offsets, until)
                pending.extend(data[:cut])
                position = until if cut < len(data) else data_offsets[-1] + 1
            for event in events:
                position = _handle_event(consumer, event, position, offsets, fail_on_data_loss, poll_timeout_ms)
            if len(pending) >= batch_rows or (pending and position >= until):
                yield to_record_batch(columns_of(pending, topic, partition))
                pending = []
    finally:
        consumer.unassign()
