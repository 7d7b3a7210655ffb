"""Exactly-once writes: each input range as a sequence of bounded Kafka transactions, each marked done inside itself.

Where things run:

- :func:`produce_exactly_once` runs in executor Python workers, once per task of ``streamhydro serve``'s
  micro-batch, that is once per input topic-partition range (:mod:`streamhydro.executor.direct` hands it
  the task's read and scoring functions). The range comes from Spark's offset planning, the same on every
  attempt and every replay of the micro-batch.
- :func:`check_transactions` runs on the driver once at start.

A task's transactions (``transactional.id`` = ``<prefix>-<input topic>-<input partition>``, the same for
every attempt and every restart of the query) each hold the predictions and dead letters of a contiguous
sub-range ``[a, b)`` of the task's range ``[from, until)`` and, through ``send_offsets_to_transaction``,
the mark ``b`` as the committed offset of the input partition in the consumer group ``<prefix>``
(:func:`mark_metadata`: query, batch, ``from``, ``until`` and ``end = b``). Before writing, an attempt
calls ``init_transactions``, which fences every earlier producer of that id and finishes its transaction
(commit or abort), then reads the group's committed offset (a stable read: librdkafka asks with
``require_stable``) and checks it with its metadata (:func:`written_up_to`): a mark of this query and
batch at ``b`` means earlier attempts wrote ``[from, b)`` and the attempt reads, scores and writes only
``[b, until)``; a mark this query's history cannot explain (the group reset or deleted, a copied
checkpoint) fails the task with :class:`MarkMismatch`, naming the group and the fix.

A transaction is closed, and the next begun, once it holds about :data:`TRANSACTION_RECORDS` input records
or has been open :data:`TRANSACTION_TIME_SHARE` of ``transaction.timeout.ms`` (:class:`TransactionBounds`;
the cut is between input pieces, :class:`Transaction`), so no transaction nears its timeout whatever the
range's size or the model's speed, and a retry never starts over: no batch can fail forever for its size.

A transaction's results are whole when its scoring ends: the task reads its range itself, in the same
process, and a failure to read or score any of it raises through the iterator, which aborts the open
transaction (the committed ones stay, with their marks). The races this answers, and why each is safe,
are in ``docs/delivery.md``.

A transactional producer serves one task: it is created for the task and closed at its end, never cached,
because ``init_transactions`` is allowed once per producer and must run in every attempt.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka import KafkaError as ClientError

from streamhydro.errors import ConfigError, KafkaConnectorError
from streamhydro.kafka import clients
from streamhydro.kafka.options import ClientConfig, Delivery
from streamhydro.kafka.planning import OffsetRange
from streamhydro.kafka.writing import PREDICTION_PRODUCER_DEFAULTS, send_all

log = logging.getLogger(__name__)

# A transaction stays open while its task reads, scores and writes one part of its range. The broker
# aborts one open longer than this (its own cap, transaction.max.timeout.ms, is 15 minutes by default);
# the task then fails and Spark retries it from the last committed part. Without a restart, a crashed task's open transaction holds read_committed consumers
# of the output partitions back for up to this long.
TRANSACTION_TIMEOUT_KEY = "transaction.timeout.ms"
TRANSACTION_DEFAULTS = {
    **{k: v for k, v in PREDICTION_PRODUCER_DEFAULTS.items() if k != "message.timeout.ms"},
    TRANSACTION_TIMEOUT_KEY: "120000",
}
# A range is written as a sequence of transactions, each closed once it holds this many input records or
# has been open this share of transaction.timeout.ms, so none nears the timeout whatever the range's size
# and a retry resumes at the last one committed.
TRANSACTION_RECORDS = 50_000
TRANSACTION_TIME_SHARE = 1 / 3
PROBE_TOPIC = "__streamhydro_transaction_probe"
# The marks group's anchor: a mark on a partition no query reads, committed by the driver before the
# query's first write (streamhydro.kafka.marks). Gone, the group was deleted.
ANCHOR = (PROBE_TOPIC, 0)
_TIMEOUT_S = 30.0
_GRACE_S = 10.0
_FENCING_THREADS = 8


def transaction_timeout_ms(config: ClientConfig) -> int:
    return int(config.get(TRANSACTION_TIMEOUT_KEY) or TRANSACTION_DEFAULTS[TRANSACTION_TIMEOUT_KEY])


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


def _committed(marks: Consumer, topic: str, partition: int) -> tuple[int, str | None, bool]:
    """The group's committed offset of ``topic[partition]`` (negative when none), its metadata, and whether
    the group holds its :data:`ANCHOR`; waits out pending transactions."""
    try:
        found, anchor = marks.committed([TopicPartition(topic, partition), TopicPartition(*ANCHOR)], timeout=_TIMEOUT_S)
    except KafkaException as exc:
        raise KafkaConnectorError(f"reading which ranges of {topic}[{partition}] are written: {exc.args[0].str()}") from exc
    for tp in (found, anchor):
        if tp.error is not None:
            raise KafkaConnectorError(f"reading which ranges of {topic}[{partition}] are written: {tp.error.str()}")
    return found.offset, found.metadata, anchor.offset >= 0


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


@dataclasses.dataclass(frozen=True)
class TransactionBounds:
    """When a task closes its open transaction and begins the next one (pure: tested without Kafka).

    A transaction takes input pieces until it holds ``records`` input records or has been open ``seconds``
    (checked before each piece is read); it always takes at least one piece, so every transaction moves
    the mark forwards. ``piece_rows`` cuts the input into pieces that small, so the clock is read at least
    every ``piece_rows`` records: one piece's scoring is the most a transaction can overrun ``seconds`` by
    (plus the pieces already in the scoring pipeline, its flush and its commit).
    """

    records: int = TRANSACTION_RECORDS
    seconds: float = int(TRANSACTION_DEFAULTS[TRANSACTION_TIMEOUT_KEY]) / 1000 * TRANSACTION_TIME_SHARE
    piece_rows: int = TRANSACTION_RECORDS

    @classmethod
    def of(cls, config: ClientConfig, piece_rows: int, records: int = TRANSACTION_RECORDS) -> TransactionBounds:
        """The bounds for a transactional producer's ``config``: a share of its ``transaction.timeout.ms``."""
        timeout_ms = transaction_timeout_ms(config)
        return cls(records=records, seconds=timeout_ms / 1000 * TRANSACTION_TIME_SHARE, piece_rows=max(1, min(piece_rows, records)))

    def full(self, records: int, open_s: float) -> bool:
        """Whether a transaction holding ``records`` input records, open for ``open_s`` seconds, takes no more."""
        return records > 0 and (records >= self.records or open_s >= self.seconds)


def pieces(batches: Iterable[pa.RecordBatch], rows: int) -> Iterator[pa.RecordBatch]:
    """``batches`` cut (without copying) into batches of at most ``rows`` rows; empty ones dropped."""
    for batch in batches:
        for start in range(0, batch.num_rows, rows):
            yield batch.slice(start, rows)


class Transaction:
    """The input of one transaction: pieces pulled from ``source`` until ``bounds`` say it is full.

    Iterate it once (the scoring reads it, possibly from its own thread); then ``finished`` says the
    scoring read it to its end, ``source_ended`` whether the input ended in it, and ``end`` is one past the
    last input offset it held (None when it held none).
    """

    def __init__(self, source: Iterator[pa.RecordBatch], bounds: TransactionBounds, clock=time.monotonic) -> None:
        self._source = source
        self._bounds = bounds
        self._clock = clock
        self._began = clock()
        self.records = 0
        self.end: int | None = None
        self.source_ended = False
        self.finished = False

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        while not self._bounds.full(self.records, self._clock() - self._began):
            piece = next(self._source, None)
            if piece is None:
                self.source_ended = True
                break
            self.records += piece.num_rows
            self.end = piece.column("offset")[-1].as_py() + 1
            yield piece
        self.finished = True

    def mark_offset(self, until: int) -> int:
        """Where this transaction's mark goes: ``until`` when the input ended in it (offsets past its last
        record are gaps or gone), else one past its last record."""
        if not self.finished:
            raise KafkaConnectorError(f"the scoring ended before it had read its input (after {self.records} records); nothing is committed")
        return until if self.source_ended or self.end is None else self.end


def mark_metadata(prefix: str, batch_id: int | None, offsets: OffsetRange, end: int | None = None) -> str:
    """The metadata committed with a mark at ``end`` (default: the range's end) inside the range ``offsets``:
    enough to check it belongs to this query, this batch and this range."""
    return json.dumps(
        {
            "query": prefix,
            "batch": batch_id,
            "from": offsets.from_offset,
            "until": offsets.until_offset,
            "end": offsets.until_offset if end is None else end,
        },
        separators=(",", ":"),
    )


def written_up_to(prefix: str, batch_id: int | None, offsets: OffsetRange, committed: int, metadata: str | None) -> int:
    """Up to which offset earlier attempts wrote ``offsets``, from the group's mark (``committed`` offset and
    its ``metadata``): ``from`` (write it all), ``until`` (write nothing) or an offset between them (write the
    rest, from there). Raises :class:`MarkMismatch` when this query's history cannot explain the mark
    (pure: tested without Kafka).

    This query's ranges of a partition follow each other (each starts where the previous ended), and a
    range is written as a sequence of transactions, each committing a mark at the end of what it wrote
    (metadata: query, batch, the range's ``from`` and ``until``, the mark's ``end``). So a mark is either at
    ``until`` (this range, this batch: written), strictly inside the range (this range, this batch: written
    up to there), at ``from`` (the previous range's last mark, from an earlier batch: nothing written), or
    absent (no range of this partition written yet). A mark set by hand (``kafka-consumer-groups
    --reset-offsets`` leaves no metadata) is trusted only at exactly ``from`` or ``until``: the operator's
    answer to a MarkMismatch. A mark inside the range is checked against ``until`` and the batch, not
    ``from``: a partition's first range starts at its log start, which retention can move before a replay.
    """
    group = prefix
    start, until = offsets.from_offset, offsets.until_offset
    if committed < 0:
        return start
    try:
        mark = json.loads(metadata) if metadata else None
    except json.JSONDecodeError:
        mark = None
    if not isinstance(mark, dict) or "query" not in mark or "until" not in mark:
        if committed in (start, until):
            return committed
        raise MarkMismatch(group, offsets, batch_id, committed, f"the mark is not streamhydro's (metadata {metadata!r}): the group was reset or written by another client")
    if mark["query"] != prefix:
        raise MarkMismatch(group, offsets, batch_id, committed, f"the mark belongs to {mark['query']}, another query")
    end = mark.get("end", mark["until"])
    if end != committed:
        raise MarkMismatch(group, offsets, batch_id, committed, f"the mark says it ends at {end}: the offset was moved")
    marked_by = mark.get("batch")
    same_batch = batch_id is None or marked_by is None or marked_by == batch_id
    if start < committed <= until:
        if not same_batch:
            raise MarkMismatch(
                group, offsets, batch_id, committed,
                f"the range was marked by batch {marked_by}: another deployment with a copy of this checkpoint writes the same ranges",
            )
        if mark["until"] != until:
            raise MarkMismatch(
                group, offsets, batch_id, committed,
                f"the mark is of a range ending at {mark['until']}, where no range of this query's batch {batch_id} ends",
            )
        return committed
    if committed == start:
        if batch_id is not None and marked_by is not None and marked_by >= batch_id:
            raise MarkMismatch(
                group, offsets, batch_id, committed,
                f"the previous range was marked by batch {marked_by}, not an earlier one: another deployment with a copy of this checkpoint writes the same partition",
            )
        if mark["until"] != committed:
            raise MarkMismatch(
                group, offsets, batch_id, committed,
                f"the mark is partway through batch {marked_by}'s range, which ends at {mark['until']}: that batch was never finished",
            )
        return start
    if committed > until:
        problem = "the mark is past this range: the group was reset forwards (to latest?) or another deployment with a copy of this checkpoint is ahead"
    else:
        problem = "the mark is before this range: the group was reset backwards, or another deployment with a copy of this checkpoint is behind"
    raise MarkMismatch(group, offsets, batch_id, committed, problem)


def produce_exactly_once(
    client: ClientConfig,
    offsets: OffsetRange,
    read: Callable[[OffsetRange], Iterator[pa.RecordBatch]],
    score: Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]],
    prefix: str,
    batch_id: int | None = None,
    piece_rows: int = TRANSACTION_RECORDS,
    records: int | None = None,
    anchored: bool = False,
) -> int:
    """Write the results of the input range ``offsets`` as a sequence of bounded transactions, from where
    earlier attempts' marks say they stopped. Returns the number of records this call wrote (0 when the
    range was already written).

    ``read(rest)`` yields the input records of the sub-range ``rest`` as RecordBatches with an ``offset``
    column; ``score(batches)`` turns input batches into results (their ``topic`` column says where each
    goes). Each transaction scores a group of input pieces (:class:`TransactionBounds`: at most about
    ``records`` records, default :data:`TRANSACTION_RECORDS`, cut into pieces of ``piece_rows``, open at most a third of ``transaction.timeout.ms``
    before it stops reading) and commits the mark one past its last input offset, the last one at ``until``.
    ``anchored``: the driver committed the group's :data:`ANCHOR` before the query's first write, so a group
    without it was deleted, and the task fails with :class:`MarkMismatch` instead of rewriting.
    """
    where = f"{offsets.topic}[{offsets.partition}]"
    tid = transactional_id(prefix, offsets.topic, offsets.partition)
    marks = clients.consumer(marks_config(client, prefix))
    config = transactional_config(client, tid)
    bounds = TransactionBounds.of(config, piece_rows, TRANSACTION_RECORDS if records is None else records)
    producer = clients.build_client(Producer, config)
    began: float | None = None
    sent = transactions = 0
    try:
        patience_s = transaction_timeout_ms(config) / 1000
        retried(lambda: producer.init_transactions(_TIMEOUT_S), f"{tid}: init_transactions", time.monotonic() + patience_s)
        done, metadata, anchor = _committed(marks, offsets.topic, offsets.partition)
        if anchored and not anchor:
            raise MarkMismatch(
                prefix, offsets, batch_id, done,
                f"the group's anchor ({ANCHOR[0]}[{ANCHOR[1]}]) is gone: the group was deleted while the query ran. "
                "Restart serve: it names the offset to set for every partition",
            )
        position = written_up_to(prefix, batch_id, offsets, done, metadata)
        if position >= offsets.until_offset:
            log.info("batch %s: %s up to offset %d was written by an earlier attempt; writing nothing", batch_id, where, done)
            return 0
        if position > offsets.from_offset:
            log.info("batch %s: %s written up to offset %d by an earlier attempt; writing the rest", batch_id, where, position)
        source = pieces(read(OffsetRange(offsets.topic, offsets.partition, position, offsets.until_offset)), bounds.piece_rows)
        flush_s = int(config.get("message.timeout.ms") or config.get(TRANSACTION_TIMEOUT_KEY)) / 1000 + _GRACE_S
        while position < offsets.until_offset:
            producer.begin_transaction()
            began = time.monotonic()
            part = Transaction(source, bounds)
            written = send_all(producer, score(iter(part)), flush_s).confirmed(flush_s)
            end = part.mark_offset(offsets.until_offset)
            mark = TopicPartition(offsets.topic, offsets.partition, end, metadata=mark_metadata(prefix, batch_id, offsets, end))
            # Within the transaction's timeout a call that timed out (a broker stalled or electing a
            # coordinator) resumes where it stopped when called again; past it the broker aborts anyway.
            deadline = began + patience_s
            retried(lambda: producer.send_offsets_to_transaction([mark], marks.consumer_group_metadata(), _TIMEOUT_S), f"{tid}: send_offsets_to_transaction", deadline)
            retried(lambda: producer.commit_transaction(_TIMEOUT_S), f"{tid}: commit_transaction", deadline)
            log.debug("batch %s: %s [%d, %d) written in transaction %s: %d records", batch_id, where, position, end, tid, written)
            began = None
            position = end
            sent += written
            transactions += 1
    except KafkaException as exc:
        if began is not None and not exc.args[0].fatal():
            _abort(producer, tid)
        raise KafkaConnectorError(_failure(exc.args[0], tid, config, began)) from exc
    except BaseException:
        if began is not None:
            _abort(producer, tid)
        raise
    finally:
        _close(producer, tid)
    log.info(
        "batch %s: %s up to offset %d written by %s in %d transactions: %d records",
        batch_id, where, offsets.until_offset, tid, transactions, sent,
    )
    return sent


def fence(client: ClientConfig, prefix: str, partitions: Iterable[tuple[str, int]]) -> None:
    """Fence every earlier producer of the query's transactional ids for ``partitions`` and finish their open
    transactions: ``init_transactions`` on a new producer of each id, which makes the broker abort what an
    earlier one left open (a task or a whole serve killed mid-transaction). Its pending marks then stop
    holding stable reads of the group back at once, instead of until the broker's transaction timeout; a
    task of an earlier driver still running (a zombie) is fenced and can no longer commit. Runs on the driver
    at start, before the marks are read; a few at a time, each bounded by ``transaction.timeout.ms``."""
    ids = sorted({transactional_id(prefix, topic, partition) for topic, partition in partitions})

    def one(tid: str) -> None:
        config = transactional_config(client, tid)
        producer = clients.build_client(Producer, config)
        try:
            retried(lambda: producer.init_transactions(_TIMEOUT_S), f"{tid}: init_transactions", time.monotonic() + transaction_timeout_ms(config) / 1000)
        except KafkaException as exc:
            raise KafkaConnectorError(f"fencing earlier producers of transaction {tid}: {exc.args[0].str()}") from exc
        finally:
            _close(producer, tid)

    if ids:
        with ThreadPoolExecutor(max_workers=min(_FENCING_THREADS, len(ids)), thread_name_prefix="streamhydro-fence") as pool:
            list(pool.map(one, ids))
        log.info("fenced %d transactional ids %s-*: no earlier producer of this query can commit", len(ids), prefix)


def retried(call: Callable[[], None], what: str, deadline: float, clock: Callable[[], float] = time.monotonic) -> None:
    """``call()``, called again while it fails with an error librdkafka marks retriable ("retry call to
    resume": a timeout while the broker stalls or moves the transaction coordinator) and ``clock()`` is
    before ``deadline``; any other error, or the last one, is raised."""
    while True:
        try:
            call()
            return
        except KafkaException as exc:
            error = exc.args[0]
            if not error.retriable() or clock() >= deadline:
                raise
            log.warning("%s: %s; calling it again", what, error.str())


def _close(producer: Producer, tid: str) -> None:
    """Close a transactional producer. One left in a fatal state (an abort that failed: librdkafka answers
    INVALID_TXN_STATE to an abort racing the transaction's first partitions) raises that error again on
    close, which would replace the exception that ended the task; it is logged instead."""
    try:
        producer.close()
    except KafkaException as exc:
        log.warning("transactional producer %s closed in a failed state (%s); the next attempt with this id starts clean", tid, exc.args[0].str())


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
    timeout_ms = transaction_timeout_ms(config)
    if began is not None and (time.monotonic() - began) * 1000 >= timeout_ms:
        message += (
            f". It was open longer than {TRANSACTION_TIMEOUT_KEY} ({timeout_ms} ms), so the broker aborted it: a transaction "
            f"stops reading after a third of that, so scoring one batch took longer than the rest. "
            f"Fix: raise kafka.client.{TRANSACTION_TIMEOUT_KEY} (at most the broker's transaction.max.timeout.ms) "
            "or lower inference.batch_size"
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
        raise ConfigError("kafka.delivery", f"{Delivery.EXACTLY_ONCE} needs Kafka transactions; the broker at {bootstrap} refused them: {error.str()}", refuse_fix) from exc
    finally:
        _close(producer, config.get("transactional.id"))
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
