"""Producing Arrow batches to Kafka with every record's delivery confirmed.

Runs in executor Python workers, once per task of ``serve`` with streamhydro's connector
(:mod:`streamhydro.executor.direct`). With at-least-once delivery (the default) the task calls
:func:`produce_batches`, with the worker's cached producer; exactly-once writes
(:mod:`streamhydro.kafka.transactions`) use :func:`send_all` inside a transaction.

Nothing is dropped silently: each record gets a delivery callback; after the last record the producer is
flushed with a bounded timeout; a record refused by ``produce()``, failed in its callback, or still
unconfirmed at the timeout raises :class:`DeliveryError`, the task fails and Spark retries it. A retried
task produces its records again (at-least-once; consumers deduplicate on the input's topic/partition/offset),
unless the write is transactional, where the failed attempt's records are aborted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

import pyarrow as pa
from confluent_kafka import KafkaError as ClientError
from confluent_kafka import KafkaException, Message, Producer

from streamhydro.errors import DeliveryError
from streamhydro.kafka import clients
from streamhydro.kafka.options import ClientConfig
from streamhydro.kafka.records import outgoing

log = logging.getLogger(__name__)

# The prediction and dead-letter producer of a write task: defaults for throughput and safety; user kafka.*
# settings win. Transactional writers start from these too (transactions.TRANSACTION_DEFAULTS).
PREDICTION_PRODUCER_DEFAULTS = {
    "enable.idempotence": "true",
    "acks": "all",
    # A task flushes at its end, so a long linger is paid once per task and buys nothing on loopback:
    # 100k x 100 B from one worker (Tansu, 2 busy cores) moved 389k / 297k / 202k / 129k rows/s
    # at linger.ms 5 / 20 / 50 / 100.
    "linger.ms": "5",
    "batch.size": "1000000",
    "queue.buffering.max.messages": "500000",
    # Java's default partitioner: a key lands on the partition Spark's JVM Kafka sink would choose.
    "partitioner": "murmur2_random",
    # Java's delivery.timeout.ms default; librdkafka's own (300 s) makes a stuck task wait 5 minutes.
    "message.timeout.ms": "120000",
}
_FLUSH_GRACE_S = 10.0
_POLL_EVERY = 5000


def producer_config(client: ClientConfig) -> ClientConfig:
    return client.with_defaults(PREDICTION_PRODUCER_DEFAULTS)


class DeliveryTracker:
    """Counts what happened to the records of one task: handed to the producer, confirmed, failed in a
    callback, or refused by ``produce()`` itself (too large, unknown partition...)."""

    def __init__(self) -> None:
        self.sent = 0
        self.delivered = 0
        self.failed = 0
        self.refused = 0
        self.fatal = False
        self.first_error: str | None = None
        self.flush_seconds = 0.0

    def __call__(self, error: ClientError | None, message: Message) -> None:
        if error is None:
            self.delivered += 1
            return
        self.failed += 1
        self._note(f"{message.topic()}[{message.partition()}]: {error.str()}", error.fatal())

    def refuse(self, topic: str, error: ClientError) -> None:
        self.refused += 1
        self._note(f"{topic}: {error.str()}", error.fatal())

    def _note(self, description: str, fatal: bool) -> None:
        self.fatal = self.fatal or fatal
        if self.first_error is None:
            self.first_error = description

    def confirmed(self, waited_s: float) -> int:
        """The number of records, once every one was confirmed; else raise DeliveryError."""
        unconfirmed = self.sent - self.delivered - self.failed
        if self.failed or self.refused or unconfirmed:
            first = self.first_error or f"{unconfirmed} records unconfirmed after {waited_s:.0f} s"
            raise DeliveryError(
                failed=self.failed + self.refused + unconfirmed, total=self.sent + self.refused, first_error=first
            )
        return self.sent


@dataclass(frozen=True)
class WriteResult:
    """``rows`` delivered; ``flush_seconds``: the wait for their confirmations after the last was handed over."""

    rows: int
    flush_seconds: float


def _produce_all(producer: Producer, batch: pa.RecordBatch, tracker: DeliveryTracker) -> int:
    """Hand one batch to the producer; returns how many records it accepted (stops at the first refusal)."""
    records = outgoing(batch)
    produce = producer.produce
    for i, (topic, key, value, headers) in enumerate(
        zip(records.topics, records.keys, records.values, records.headers, strict=True)
    ):
        while True:
            try:
                produce(topic, value, key, on_delivery=tracker, headers=headers)
                break
            except BufferError:
                producer.poll(0.05)
            except KafkaException as exc:
                tracker.refuse(topic, exc.args[0])
                return i
        if i % _POLL_EVERY == 0:
            producer.poll(0)
    return len(records)


def flush_timeout_s(config: ClientConfig) -> float:
    """How long a flush may wait for the last confirmations: the producer's own delivery timeout and a grace."""
    return int(config.get("message.timeout.ms") or PREDICTION_PRODUCER_DEFAULTS["message.timeout.ms"]) / 1000 + _FLUSH_GRACE_S


def send_all(producer: Producer, batches: Iterable[pa.RecordBatch], timeout_s: float) -> DeliveryTracker:
    """Hand every row of ``batches`` (results: :func:`~streamhydro.kafka.records.outgoing`) to ``producer``,
    stopping at the first failure, and flush.

    The returned tracker says what became of them; :meth:`DeliveryTracker.confirmed` turns it into a count
    or a DeliveryError.
    """
    tracker = DeliveryTracker()
    for batch in batches:
        tracker.sent += _produce_all(producer, batch, tracker)
        if tracker.refused or tracker.failed:
            break
    started = time.perf_counter()
    producer.flush(timeout_s)
    tracker.flush_seconds = time.perf_counter() - started
    return tracker


def produce_batches(client: ClientConfig, batches: Iterable[pa.RecordBatch]) -> WriteResult:
    """Produce every row of ``batches``; return once all are confirmed, else raise DeliveryError."""
    config = producer_config(client)
    producer = clients.producer(config)
    timeout_s = flush_timeout_s(config)
    tracker = send_all(producer, batches, timeout_s)
    if tracker.fatal:
        clients.discard_producer(config, producer)
    sent = tracker.confirmed(timeout_s)
    log.info("delivered %d records", sent)
    return WriteResult(rows=sent, flush_seconds=tracker.flush_seconds)
