"""Checking the service from outside: every event has exactly one outcome, and the right one.

Runs in a client process (the fault-injection benchmark, tests), against the topics only: nothing here
asks the service anything. Two parts:

- :class:`OutcomeLedger` reads the output and dead-letter topics from the beginning (in a thread while
  the service runs; then, with the service's processes gone, to the end offsets those topics have after
  it) and keeps, per input event, its outcome (prediction or dead
  letter), a 64-bit digest of the first output record's key, value and headers, and the prediction's
  scores: about 17 bytes per event, in numpy arrays per input partition, whatever the number of output
  records. A later record for the same event is a duplicate; a duplicate whose digest or outcome differs
  from the first is a mismatch. Predictions are matched to their event by ``idempotency_key``
  (``topic/partition/offset``), dead letters by their ``streamhydro.origin.*`` headers.
- :func:`check_events` reads the input topic in chunks and, for each event, decides independently of
  the service's decoder whether it is well-formed (:func:`reference_inputs`, the payload rules written
  with Python's ``json``), runs ONNX Runtime on the CPU directly on the well-formed ones and compares
  with the scores the service wrote.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from streamhydro.kafka.options import ClientConfig
from streamhydro.payload import HEADER_ERROR_CLASS, HEADER_ORIGIN_OFFSET, HEADER_ORIGIN_PARTITION, HEADER_ORIGIN_TOPIC
from streamhydro.config import PayloadSettings
from streamhydro.precision import Tolerance, score_tolerance
from streamhydro.registry import Manifest, ModelVersion

NONE, PREDICTION, DEAD_LETTER = 0, 1, 2
_POLL_S = 0.2
_BATCH = 10_000


def _digest(key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes | None]] | None) -> int:
    """64 bits of BLAKE2b over a record's key, value and headers, each part length-prefixed."""
    h = hashlib.blake2b(digest_size=8)
    for part in (key, value, *(piece for name, v in headers or () for piece in (name.encode(), v))):
        h.update(b"\xff" if part is None else len(part).to_bytes(4, "little") + part)
    return int.from_bytes(h.digest(), "little")


class _PartitionOutcomes:
    """Outcome, digest and scores per offset of one input partition, grown by doubling."""

    def __init__(self, labels: int) -> None:
        self.outcome = np.zeros(0, np.uint8)
        self.digest = np.zeros(0, np.uint64)
        self.scores = np.zeros((0, labels), np.float32)

    def reserve(self, offset: int) -> None:
        size = len(self.outcome)
        if offset < size:
            return
        grown = max(offset + 1, 2 * size, 1024)
        self.outcome = np.concatenate([self.outcome, np.zeros(grown - size, np.uint8)])
        self.digest = np.concatenate([self.digest, np.zeros(grown - size, np.uint64)])
        self.scores = np.concatenate([self.scores, np.zeros((grown - size, self.scores.shape[1]), np.float32)])

    def recorded(self, end: int) -> int:
        return int(np.count_nonzero(self.outcome[:end]))


class OutcomeLedger:
    """Outcomes of the input events, read from ``output_topic`` and ``dead_letter_topic``.

    ``read_committed``: read as an exactly-once consumer does (only committed transactions). Counters
    (``records``, ``distinct`` events, ``duplicates``, ``mismatches``, ``unreadable``, ``dead_letter_classes``) may be read
    from any thread. ``start()`` reads in a thread; ``stop()`` ends it; :meth:`catch_up` then reads to
    given end offsets in the caller's thread; :meth:`close` at the end.
    """

    def __init__(self, client: ClientConfig, output_topic: str, dead_letter_topic: str, labels: Sequence[str], read_committed: bool = False) -> None:
        from confluent_kafka import Consumer

        from streamhydro.kafka.clients import build_client

        settings = {
            "group.id": "streamhydro-audit",
            "enable.auto.commit": "false",
            "isolation.level": "read_committed" if read_committed else "read_uncommitted",
            # Where each read reached its partition's end: a read_committed position stops short of a
            # transaction's commit marker, the end-of-partition event's offset does not.
            "enable.partition.eof": "true",
        }
        self._consumer = build_client(Consumer, client.with_defaults(settings))
        self.output_topic = output_topic
        self.dead_letter_topic = dead_letter_topic
        self.labels = tuple(labels)
        self._partitions: dict[tuple[str, int], _PartitionOutcomes] = {}
        self.records = 0
        self.distinct = 0
        self.duplicates = 0
        self.mismatches = 0
        self.unreadable = 0
        self.dead_letter_classes: Counter[str] = Counter()
        self._reached: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="outcome-ledger", daemon=True)

    def start(self) -> None:
        from confluent_kafka import OFFSET_BEGINNING, TopicPartition

        metadata = self._consumer.list_topics(timeout=10).topics
        self._consumer.assign(
            [TopicPartition(t, p, OFFSET_BEGINNING) for t in (self.output_topic, self.dead_letter_topic) for p in metadata[t].partitions]
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def close(self) -> None:
        """Stop the reading thread if it still runs (a close waits for the consumer's other calls to end),
        and release the consumer."""
        if self._thread.is_alive():
            self.stop()
        self._consumer.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._consume(_POLL_S)

    def _consume(self, timeout_s: float) -> int:
        from confluent_kafka import KafkaError

        messages = self._consumer.consume(_BATCH, timeout=timeout_s)
        records = [m for m in messages if m.error() is None]
        with self._lock:
            for message in records:
                self._note(message)
            for message in messages:
                if message.error() is not None and message.error().code() == KafkaError._PARTITION_EOF:
                    self._reached[(message.topic(), message.partition())] = message.offset()
        return len(records)

    def catch_up(self, ends: Mapping[tuple[str, int], int], timeout_s: float) -> bool:
        """After :meth:`stop`, with the service's processes gone: read until the read of every partition of
        ``ends`` (``{(topic, partition): end offset}``, taken after they were gone) reached its end at that
        offset or past it. For a read_committed read that is also where every transaction below it was
        decided. False if ``timeout_s`` ran out first."""
        deadline = time.monotonic() + timeout_s
        while self.behind(ends):
            if time.monotonic() >= deadline:
                return False
            self._consume(_POLL_S)
        return True

    def behind(self, ends: Mapping[tuple[str, int], int]) -> dict[tuple[str, int], int]:
        """The partitions of ``ends`` whose read has not reached its end there yet, with the offset where
        it last reached an end (-1: never)."""
        with self._lock:
            return {tp: self._reached.get(tp, -1) for tp, end in ends.items() if self._reached.get(tp, -1) < end}

    def _note(self, message: Any) -> None:
        headers = message.headers() or []
        digest = _digest(message.key(), message.value(), headers)
        try:
            if message.topic() == self.output_topic:
                document = json.loads(message.value())
                topic, partition, offset = document["idempotency_key"].rsplit("/", 2)
                scores = [math.nan if (s := document["prediction"]["scores"][label]) is None else s for label in self.labels]
                outcome = PREDICTION
            else:
                named = {name: value.decode() for name, value in headers if value is not None}
                topic, partition, offset = named[HEADER_ORIGIN_TOPIC], named[HEADER_ORIGIN_PARTITION], named[HEADER_ORIGIN_OFFSET]
                scores = None
                outcome = DEAD_LETTER
            position = (topic, int(partition))
            offset = int(offset)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            self.unreadable += 1
            return
        self.records += 1
        outcomes = self._partitions.setdefault(position, _PartitionOutcomes(len(self.labels)))
        outcomes.reserve(offset)
        if outcomes.outcome[offset] != NONE:
            self.duplicates += 1
            if outcomes.outcome[offset] != outcome or int(outcomes.digest[offset]) != digest:
                self.mismatches += 1
            return
        self.distinct += 1
        outcomes.outcome[offset] = outcome
        outcomes.digest[offset] = digest
        if scores is not None:
            outcomes.scores[offset] = scores
        else:
            self.dead_letter_classes[named.get(HEADER_ERROR_CLASS, "?")] += 1

    def recorded(self, ends: Mapping[tuple[str, int], int]) -> int:
        """How many events below ``ends`` (``{(topic, partition): end offset}``) have an outcome."""
        with self._lock:
            return sum(self._partitions[tp].recorded(end) for tp, end in ends.items() if tp in self._partitions)

    def recorded_from(self, starts: Mapping[tuple[str, int], int]) -> int:
        """How many events at or above ``starts`` (``{(topic, partition): offset}``) have an outcome."""
        with self._lock:
            return sum(
                int(np.count_nonzero(self._partitions[tp].outcome[start:])) for tp, start in starts.items() if tp in self._partitions
            )

    def outcomes(self, position: tuple[str, int], offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The outcome and the scores (rows of zeros where there is no prediction) of these offsets of one partition."""
        with self._lock:
            outcomes = self._partitions.get(position)
            if outcomes is None:
                return np.zeros(len(offsets), np.uint8), np.zeros((len(offsets), len(self.labels)), np.float32)
            outcomes.reserve(int(offsets.max(initial=0)))
            return outcomes.outcome[offsets].copy(), outcomes.scores[offsets].copy()


def reference_inputs(value: bytes | None, manifest: Manifest) -> dict[str, list[Any]] | None:
    """One JSON event's model inputs by the payload rules (``streamhydro.payload.formats.json``), read with
    Python's ``json`` rather than the service's decoder; None when the event must be a dead letter."""
    if not value or len(value) > PayloadSettings().max_value_bytes:
        return None
    try:
        document = json.loads(value.decode("utf-8-sig", "surrogateescape"))  # the last of a repeated field counts
    except (ValueError, RecursionError):
        return None
    if not isinstance(document, dict):
        return None
    inputs = {}
    for spec in manifest.inputs:
        values = [document.get(name) for name in spec.features] if spec.features else document.get(spec.name)
        if not isinstance(values, list) or len(values) != spec.width:
            return None
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
            return None
        try:
            numbers = [float(v) for v in values]
        except OverflowError:
            return None
        limit = float(np.finfo(np.dtype(spec.dtype)).max)
        if not all(math.isfinite(v) and abs(v) <= limit for v in numbers):
            return None
        inputs[spec.name] = values
    return inputs


@dataclasses.dataclass
class EventCheck:
    """What :func:`check_events` found. ``malformed``: events the payload rules reject; ``wrong_predictions``:
    predictions that differ from ONNX Runtime's, or exist for a malformed event; ``unexpected_dead_letters``:
    dead letters of well-formed events; ``compared``: predictions compared with ONNX Runtime."""

    events: int = 0
    malformed: int = 0
    compared: int = 0
    wrong_predictions: int = 0
    unexpected_dead_letters: int = 0


def check_events(
    client: ClientConfig, topic: str, ends: Mapping[tuple[str, int], int], ledger: OutcomeLedger, model: ModelVersion, timeout_s: float,
    allow_tf32: bool = False,
) -> EventCheck:
    """Read the events below ``ends`` in chunks and check each one's outcome in ``ledger`` (see the module
    docstring). Scores are compared within :func:`streamhydro.precision.score_tolerance` of the service's
    ``inference.allow_tf32``. Raises TimeoutError when the events could not be read within ``timeout_s``."""
    import onnxruntime as ort
    from confluent_kafka import Consumer, TopicPartition

    from streamhydro.kafka.clients import build_client

    manifest = model.manifest
    session = ort.InferenceSession(model.read_bytes(), providers=["CPUExecutionProvider"])
    consumer = build_client(Consumer, client.with_defaults({"group.id": "streamhydro-audit-events", "enable.auto.commit": "false"}))
    check = EventCheck()
    remaining = {tp: end for tp, end in ends.items() if end > 0}
    deadline = time.monotonic() + timeout_s
    try:
        consumer.assign([TopicPartition(t, p, 0) for t, p in remaining])
        while remaining:
            if time.monotonic() > deadline:
                raise TimeoutError(f"read {check.events} events of {topic} within {timeout_s:.0f} s; {sum(remaining.values())} more were expected")
            by_partition: dict[tuple[str, int], list[Any]] = {}
            for message in consumer.consume(_BATCH, timeout=1.0):
                tp = (message.topic(), message.partition())
                if message.error() is None and tp in remaining and message.offset() < ends[tp]:
                    by_partition.setdefault(tp, []).append(message)
            for tp, messages in by_partition.items():
                _check_chunk(tp, messages, ledger, manifest, session, check, score_tolerance(allow_tf32))
                if messages[-1].offset() + 1 >= ends[tp]:
                    del remaining[tp]
    finally:
        consumer.close()
    return check


def _check_chunk(
    position: tuple[str, int], messages: list[Any], ledger: OutcomeLedger, manifest: Manifest, session: Any, check: EventCheck,
    tolerance: Tolerance,
) -> None:
    offsets = np.array([m.offset() for m in messages], np.int64)
    outcome, scores = ledger.outcomes(position, offsets)
    inputs = [reference_inputs(m.value(), manifest) for m in messages]
    good = np.array([i is not None for i in inputs], bool)
    check.events += len(messages)
    check.malformed += int(np.count_nonzero(~good))
    check.wrong_predictions += int(np.count_nonzero(~good & (outcome == PREDICTION)))
    check.unexpected_dead_letters += int(np.count_nonzero(good & (outcome == DEAD_LETTER)))
    predicted = np.flatnonzero(good & (outcome == PREDICTION))
    if not len(predicted):
        return
    feeds = {
        spec.name: np.array([inputs[i][spec.name] for i in predicted], dtype=spec.dtype).reshape(-1, *spec.shape[1:])
        for spec in manifest.inputs
    }
    expected = session.run([manifest.scores_output.name], feeds)[0].reshape(len(predicted), -1)
    same = tolerance.close(scores[predicted], expected).all(axis=1)
    check.compared += len(predicted)
    check.wrong_predictions += int(np.count_nonzero(~same))
