"""Reading what the service wrote: counts, distinct events, and produce->prediction latency.

Runs in a client process, in a thread (the demo's driver, benchmarks, tests). :class:`OutputReader`
reads the output topics from the beginning with its own consumer and takes the wall-clock time as each
batch of records arrives (``consume`` returns as soon as records are there; the poll timeout only
bounds an idle wait). Predictions are parsed when ``track=True``:

- each prediction's ``idempotency_key`` (``topic/partition/offset`` of its event) marks that event in a
  per-partition bitmap, so distinct events and duplicates are counted in a few bytes per event;
- its latency is arrival time minus the event's producer timestamp (``source.timestamp_ms``), both read
  from this machine's clock.
"""

from __future__ import annotations

import json
import threading
import time
from array import array
from collections.abc import Sequence

import numpy as np

from streamhydro.kafka.offsets import EndOffsetProbe
from streamhydro.kafka.options import ClientConfig, Subscription

_POLL_S = 0.05


def topic_ends(client: ClientConfig, topic: str) -> dict[tuple[str, int], int]:
    """``{(topic, partition): end offset}``, right on every broker (ends read from fetches, see
    :mod:`streamhydro.kafka.offsets`): with offsets from 0, how many records each partition holds."""
    probe = EndOffsetProbe(client, use_fetch=True)
    try:
        return {tp: end for tp, (_, end) in probe.offset_ranges(probe.topic_partitions(Subscription("subscribe", (topic,)))).items()}
    finally:
        probe.close()


class OutputReader:
    """Counts records arriving on ``topics``; with ``track``, distinct events and latency of the first topic's
    predictions. ``start()`` / ``stop()``; the counters may be read at any time from another thread."""

    def __init__(self, client: ClientConfig, topics: Sequence[str], track: bool = False, group: str = "streamhydro-output-reader") -> None:
        from confluent_kafka import Consumer

        from streamhydro.kafka.clients import build_client

        self._consumer = build_client(Consumer, client.with_defaults({"group.id": group, "enable.auto.commit": "false"}))
        self._topics = tuple(topics)
        self._track = track
        self.counts = {topic: 0 for topic in topics}
        self.sample: str | None = None
        self.first_at: float | None = None
        self.last_at: float | None = None
        # (monotonic arrival time, records of the first topic so far), one entry per consumed batch.
        self.progress: list[tuple[float, int]] = []
        self._seen: dict[tuple[str, int], bytearray] = {}
        self.distinct = 0
        self.duplicates = 0
        self._latency_ms = array("d")
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="output-reader", daemon=True)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def start(self) -> None:
        from confluent_kafka import OFFSET_BEGINNING, TopicPartition

        metadata = self._consumer.list_topics(timeout=10)
        self._consumer.assign(
            [TopicPartition(t, p, OFFSET_BEGINNING) for t in self._topics for p in metadata.topics[t].partitions]
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._consumer.close()

    def latency_ms(self, since: int = 0) -> np.ndarray:
        """Latencies of the predictions read so far (from the ``since``-th on), in arrival order."""
        with self._lock:
            return np.frombuffer(self._latency_ms, dtype=np.float64)[since:].copy()

    def missing(self, sent: dict[tuple[str, int], int]) -> int:
        """How many events of ``sent`` (``{(topic, partition): events sent}``, offsets from 0) have no prediction."""
        with self._lock:
            return sum(count - int(np.count_nonzero(np.frombuffer(self._seen.get(tp, b""), np.uint8)[:count])) for tp, count in sent.items())

    def _loop(self) -> None:
        predictions = self._topics[0]
        while not self._stop.is_set():
            messages = self._consumer.consume(10_000, timeout=_POLL_S)
            if not messages:
                continue
            arrived = time.time() * 1000
            self.last_at = time.monotonic()
            if self.first_at is None:
                self.first_at = self.last_at
            for message in messages:
                if message.error() is not None:
                    continue
                topic = message.topic()
                self.counts[topic] += 1
                if topic != predictions:
                    continue
                if self.sample is None:
                    self.sample = message.value().decode()
                if self._track:
                    self._note(json.loads(message.value()), arrived)
            self.progress.append((self.last_at, self.counts[predictions]))

    def steady_rate(self, skip_fraction: float = 0.1) -> float | None:
        """Records/s of the first topic after the first ``skip_fraction`` of them arrived (the cold start)."""
        if len(self.progress) < 2:
            return None
        total = self.progress[-1][1]
        begin = next(point for point in self.progress if point[1] >= skip_fraction * total)
        seconds = self.progress[-1][0] - begin[0]
        return round((total - begin[1]) / seconds, 1) if seconds > 0 else None

    def _note(self, prediction: dict, arrived_ms: float) -> None:
        source = prediction["source"]
        key = (source["topic"], source["partition"])
        offset = source["offset"]
        with self._lock:
            seen = self._seen.setdefault(key, bytearray())
            if offset >= len(seen):
                seen.extend(bytes(max(offset + 1 - len(seen), len(seen))))
            if seen[offset]:
                self.duplicates += 1
                return
            seen[offset] = 1
            self.distinct += 1
            self._latency_ms.append(arrived_ms - source["timestamp_ms"])
