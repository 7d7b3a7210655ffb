"""Exactly-once writes: one Kafka transaction per (micro-batch, input range), marked done inside itself.

Where things run:

- :func:`produce_exactly_once` runs in executor Python workers, once per task of ``streamhydro serve``'s
  micro-batch, that is once per input topic-partition range (:mod:`streamhydro.executor.direct`: the task
  reads its range, scores it and hands the results here). The range comes from Spark's offset planning,
  the same on every attempt and every replay of the micro-batch.
- :func:`check_transactions` runs on the driver once at start.

A task's transaction (``transactional.id`` = ``<prefix>-<input topic>-<input partition>``, the same for
every attempt and every restart of the query) holds its predictions, its dead letters and, through
``send_offsets_to_transaction``, the range's end offset as the committed offset of the input partition in
the consumer group ``<prefix>``. Before writing, an attempt calls ``init_transactions``, which fences every
earlier producer of that id and finishes its transaction (commit or abort), then reads the group's
committed offset (a stable read: librdkafka asks with ``require_stable``) and checks it with its metadata
(:func:`range_written`): a mark of this query at the range's end means an earlier attempt committed the
range and the attempt writes nothing; a mark this query's history cannot explain (the group reset or
deleted, a copied checkpoint) fails the task with :class:`MarkMismatch`, naming the group and the fix.

The results are whole when the results iterator ends: the task reads its range itself, in the same
process, and a failure to read or score any of it raises through the iterator, which aborts the
transaction. The races this answers, and why each is safe, are in ``docs/delivery.md``.

A transactional producer serves one task: it is created for the task and closed at its end, never cached,
because ``init_transactions`` is allowed once per producer and must run in every attempt.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterable

import pyarrow as pa
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka import KafkaError as ClientError

from streamhydro.errors import ConfigError, KafkaConnectorError
from streamhydro.kafka import clients
from streamhydro.kafka.options import EXACTLY_ONCE, ClientConfig
from streamhydro.kafka.planning import OffsetRange
from streamhydro.kafka.writing import PREDICTION_PRODUCER_DEFAULTS, send_all

log = logging.getLogger(__name__)

# A transaction stays open while its task reads, scores and writes. The broker aborts one open longer
# than this (its own cap, transaction.max.timeout.ms, is 15 minutes by default); the task then fails and
# Spark retries it. Without a restart, a crashed task's open transaction holds read_committed consumers
# of the output partitions back for up to this long.
TRANSACTION_TIMEOUT_KEY = "transaction.timeout.ms"
TRANSACTION_DEFAULTS = {
    **{k: v for k, v in PREDICTION_PRODUCER_DEFAULTS.items() if k != "message.timeout.ms"},
    TRANSACTION_TIMEOUT_KEY: "120000",
}
PROBE_TOPIC = "__streamhydro_transaction_probe"
_TIMEOUT_S = 30.0
_GRACE_S = 10.0


def transactional_config(client: ClientConfig, transactional_id: str) -> ClientConfig:
    """A transactional producer's settings: the user's over :data:`TRANSACTION_DEFAULTS`, and the id."""
    return ClientConfig.of({**client.with_defaults(TRANSACTION_DEFAULTS).as_dict(), "transactional.id": transactional_id})


def marks_config(client: ClientConfig, group: str) -> ClientConfig:
    """A read_committed consumer of group ``group``: reads (and, in transactions, commits) its offsets."""
    return ClientConfig.of(
        {**client.as_dict(), "group.id": group, "isolation.level": "read_committed", "enable.auto.commit": "false"}
    )


def transactional_id(prefix: str, topic: str, partition: int) -> str:
    return f"{prefix}-{topic}-{partition}"


def _committed(marks: Consumer, topic: str, partition: int) -> tuple[int, str | None]:
    """The group's committed offset of ``topic[partition]`` (negative when none) and its metadata; waits out
    pending transactions."""
    try:
        [found] = marks.committed([TopicPartition(topic, partition)], timeout=_TIMEOUT_S)
    except KafkaException as exc:
        raise KafkaConnectorError(f"reading which ranges of {topic}[{partition}] are written: {exc.args[0].str()}") from exc
    if found.error is not None:
        raise KafkaConnectorError(f"reading which ranges of {topic}[{partition}] are written: {found.error.str()}")
    return found.offset, found.metadata


class MarkMismatch(KafkaConnectorError):
    """The consumer group that marks written ranges says something this query's batch history cannot
    explain: it was reset, deleted and rewritten, or is shared with another deployment (a copied checkpoint).
    Skipping or rewriting the range would lose or duplicate predictions, so the task fails instead."""

    def __init__(self, group: str, offsets: OffsetRange, batch_id: int | None, committed: int, problem: str) -> None:
        self.group = group
        self.offsets = offsets
        self.committed = committed
        where = f"{offsets.topic}:{offsets.partition}"
        super().__init__(
            f"consumer group {group} marks {offsets.topic}[{offsets.partition}] written up to offset {committed}, "
            f"but batch {batch_id} of this query writes [{offsets.from_offset}, {offsets.until_offset}): {problem}. "
            f"Fix: find out whether that range's predictions are in the output (by their idempotency_key), then set "
            f"the group's offset to {offsets.until_offset} if they are, or to {offsets.from_offset} if not: "
            f"kafka-consumer-groups.sh --bootstrap-server <servers> --group {group} --reset-offsets --to-offset <offset> "
            f"--topic {where} --execute; never share the checkpoint or the group between deployments"
        )


def mark_metadata(prefix: str, batch_id: int | None, offsets: OffsetRange) -> str:
    """The metadata committed with a range's end offset: enough to check it belongs to this query and range."""
    return json.dumps(
        {"query": prefix, "batch": batch_id, "from": offsets.from_offset, "until": offsets.until_offset}, separators=(",", ":")
    )


def range_written(prefix: str, batch_id: int | None, offsets: OffsetRange, committed: int, metadata: str | None) -> bool:
    """Whether the group's mark (``committed`` offset and its ``metadata``) says ``offsets`` was written by an
    earlier attempt (True: write nothing) or that the range is still to write (False); raises
    :class:`MarkMismatch` when the mark fits neither (pure: tested without Kafka).

    This query's ranges of a partition follow each other (each starts where the previous ended), and a
    range's mark is committed in the transaction that writes it, so a mark is either at ``until`` (this
    range, this batch: written), at ``from`` (the previous range: not written), or absent (no range of
    this partition written yet). A mark set by hand (``kafka-consumer-groups --reset-offsets`` leaves no
    metadata) is trusted only at exactly ``from`` or ``until``: the operator's answer to a MarkMismatch.
    """
    group = prefix
    if committed < 0:
        return False
    try:
        mark = json.loads(metadata) if metadata else None
    except json.JSONDecodeError:
        mark = None
    if not isinstance(mark, dict) or "query" not in mark or "until" not in mark:
        if committed in (offsets.from_offset, offsets.until_offset):
            return committed == offsets.until_offset
        raise MarkMismatch(group, offsets, batch_id, committed, f"the mark is not streamhydro's (metadata {metadata!r}): the group was reset or written by another client")
    if mark["query"] != prefix:
        raise MarkMismatch(group, offsets, batch_id, committed, f"the mark belongs to {mark['query']}, another query")
    if mark["until"] != committed:
        raise MarkMismatch(group, offsets, batch_id, committed, f"the mark says it ends at {mark['until']}: the offset was moved")
    if committed == offsets.until_offset:
        if batch_id is not None and mark.get("batch") is not None and mark["batch"] != batch_id:
            raise MarkMismatch(
                group, offsets, batch_id, committed,
                f"the range was marked by batch {mark['batch']}: another deployment with a copy of this checkpoint writes the same ranges",
            )
        return True
    if committed == offsets.from_offset:
        if batch_id is not None and mark.get("batch") is not None and mark["batch"] >= batch_id:
            raise MarkMismatch(
                group, offsets, batch_id, committed,
                f"the previous range was marked by batch {mark['batch']}, not an earlier one: another deployment with a copy of this checkpoint writes the same partition",
            )
        return False
    if committed > offsets.until_offset:
        problem = "the mark is past this range: the group was reset forwards (to latest?) or another deployment with a copy of this checkpoint is ahead"
    elif committed < offsets.from_offset:
        problem = "the mark is before this range: the group was reset backwards, or another deployment with a copy of this checkpoint is behind"
    else:
        problem = "the mark is inside this range, where no range of this query ends"
    raise MarkMismatch(group, offsets, batch_id, committed, problem)


def produce_exactly_once(
    client: ClientConfig,
    offsets: OffsetRange,
    results: Iterable[pa.RecordBatch],
    prefix: str,
    batch_id: int | None = None,
) -> int:
    """Write the results of the input range ``offsets`` in one transaction, unless an earlier attempt
    committed it. ``results`` are sink rows (their ``topic`` column says where each goes). Returns the
    number of records written (0 when the range was already written).
    """
    where = f"{offsets.topic}[{offsets.partition}]"
    tid = transactional_id(prefix, offsets.topic, offsets.partition)
    marks = clients.consumer(marks_config(client, prefix))
    config = transactional_config(client, tid)
    producer = clients.build_client(Producer, config)
    began: float | None = None
    try:
        producer.init_transactions(_TIMEOUT_S)
        done, metadata = _committed(marks, offsets.topic, offsets.partition)
        if range_written(prefix, batch_id, offsets, done, metadata):
            log.info("batch %s: %s up to offset %d was written by an earlier attempt; writing nothing", batch_id, where, done)
            return 0
        producer.begin_transaction()
        began = time.monotonic()
        flush_s = int(config.get("message.timeout.ms") or config.get(TRANSACTION_TIMEOUT_KEY)) / 1000 + _GRACE_S
        sent = send_all(producer, None, results, flush_s).confirmed(flush_s)
        mark = TopicPartition(offsets.topic, offsets.partition, offsets.until_offset, metadata=mark_metadata(prefix, batch_id, offsets))
        producer.send_offsets_to_transaction([mark], marks.consumer_group_metadata(), _TIMEOUT_S)
        producer.commit_transaction(_TIMEOUT_S)
    except KafkaException as exc:
        if began is not None and not exc.args[0].fatal():
            _abort(producer, tid)
        raise KafkaConnectorError(_failure(exc.args[0], tid, config, began)) from exc
    except BaseException:
        if began is not None:
            _abort(producer, tid)
        raise
    finally:
        producer.close()
    log.info("batch %s: %s up to offset %d written in transaction %s: %d records", batch_id, where, offsets.until_offset, tid, sent)
    return sent


def _abort(producer: Producer, tid: str) -> None:
    """Abort the open transaction; where that fails, the next attempt's ``init_transactions`` aborts it."""
    try:
        producer.abort_transaction(_TIMEOUT_S)
    except KafkaException as exc:
        log.warning("transaction %s not aborted (%s); the next attempt with this id aborts it", tid, exc.args[0].str())


def _failure(error: ClientError, tid: str, config: ClientConfig, began: float | None) -> str:
    message = f"transaction {tid} failed: {error.str()}"
    if error.code() in (ClientError._FENCED, ClientError.PRODUCER_FENCED, ClientError.INVALID_PRODUCER_EPOCH):
        message += ". A newer attempt for the same input range took over this transactional id; that attempt or Spark's retry writes the range"
    timeout_ms = int(config.get(TRANSACTION_TIMEOUT_KEY) or TRANSACTION_DEFAULTS[TRANSACTION_TIMEOUT_KEY])
    if began is not None and (time.monotonic() - began) * 1000 >= timeout_ms:
        message += (
            f". It was open longer than {TRANSACTION_TIMEOUT_KEY} ({timeout_ms} ms), so the broker aborted it. "
            f"Fix: raise kafka.client.{TRANSACTION_TIMEOUT_KEY} (at most the broker's transaction.max.timeout.ms) "
            "or lower kafka.max_offsets_per_trigger"
        )
    return message


def check_transactions(client: ClientConfig) -> None:
    """Refuse, at start, a broker on which exactly-once cannot hold.

    Writes three transactions to :data:`PROBE_TOPIC` (committed, aborted, committed) with the writers'
    producer settings, then reads them back with ``isolation.level=read_committed``: exactly the two
    committed records must come back. Tansu, for one, commits and aborts but shows aborted records to
    read_committed consumers; a broker without transactions fails ``init_transactions``.
    """
    from streamhydro.kafka.admin import ensure_topics

    bootstrap = client.get("bootstrap.servers")
    refuse_fix = 'use a broker with transactions (Apache Kafka 3 or later), or set delivery = "at_least_once"'
    ensure_topics(client, {PROBE_TOPIC: 1})
    nonce = uuid.uuid4().hex
    outcomes = ("committed", "aborted", "committed")
    values = [f"{nonce}/{i}/{outcome}".encode() for i, outcome in enumerate(outcomes)]
    config = transactional_config(client, f"streamhydro-probe-{nonce}")
    producer = clients.build_client(Producer, config)
    offsets: list[int] = []
    try:
        producer.init_transactions(_TIMEOUT_S)
        for value, outcome in zip(values, outcomes, strict=True):
            producer.begin_transaction()
            producer.produce(PROBE_TOPIC, value, partition=0, on_delivery=lambda error, message: offsets.append(message.offset()))
            producer.flush(_TIMEOUT_S)
            if outcome == "committed":
                producer.commit_transaction(_TIMEOUT_S)
            else:
                producer.abort_transaction(_TIMEOUT_S)
    except KafkaException as exc:
        error = exc.args[0]
        if error.code() == ClientError.INVALID_TRANSACTION_TIMEOUT:
            raise ConfigError(
                f"kafka.client.{TRANSACTION_TIMEOUT_KEY}",
                f"{config.get(TRANSACTION_TIMEOUT_KEY)} ms is more than the broker at {bootstrap} allows ({error.str()})",
                "lower it to the broker's transaction.max.timeout.ms or below",
            ) from exc
        raise ConfigError("kafka.delivery", f"{EXACTLY_ONCE} needs Kafka transactions; the broker at {bootstrap} refused them: {error.str()}", refuse_fix) from exc
    finally:
        producer.close()
    if not offsets:
        raise KafkaConnectorError(f"the transaction probe's first record to {PROBE_TOPIC} on {bootstrap} was not acknowledged")
    # A probe killed mid-transaction leaves it open, holding read_committed readers back until the broker
    # aborts it after the transaction timeout: wait that long for our records before giving up.
    wait_s = int(config.get(TRANSACTION_TIMEOUT_KEY)) / 1000 + _GRACE_S
    seen = [v for v in _read_committed(client, offsets[0], values[-1], wait_s) if v.startswith(nonce.encode())]
    if values[1] in seen:
        raise ConfigError(
            "kafka.delivery",
            f"the broker at {bootstrap} does not isolate transactions: a read_committed consumer of {PROBE_TOPIC} read "
            f"{[v.decode().split('/', 1)[1] for v in seen]}, the aborted record among them",
            refuse_fix,
        )
    if seen != [values[0], values[2]]:
        raise KafkaConnectorError(
            f"the transaction probe read {[v.decode().split('/', 1)[1] for v in seen]} from {PROBE_TOPIC} on {bootstrap} "
            f"within {wait_s:.0f} s, not its two committed records"
        )
    log.info("transactions on %s: an aborted record stays invisible to read_committed consumers", bootstrap)


def _read_committed(client: ClientConfig, start: int, last: bytes, wait_s: float) -> list[bytes]:
    """Values of :data:`PROBE_TOPIC` from ``start`` as a read_committed consumer sees them, up to ``last``."""
    consumer = clients.build_client(Consumer, marks_config(client, "streamhydro-transaction-probe"))
    consumer.assign([TopicPartition(PROBE_TOPIC, 0, start)])
    seen: list[bytes] = []
    deadline = time.monotonic() + wait_s
    try:
        while last not in seen and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is not None and message.error() is None:
                seen.append(message.value())
    finally:
        consumer.close()
    return seen
