"""Topic metadata and end offsets for the stream reader. Runs on the driver, in the stream reader, once per micro-batch.

A Kafka source asks where each partition ends with ListOffsets(latest). Apache Kafka answers with the
high watermark, or for a read_committed client (``isolation.level`` in ``kafka.client``, which the probe
shares with the readers) the last stable offset: ranges then end where a read_committed reader stops,
below any open transaction. With ``endOffsetsFrom=listOffsets`` (the default, what Spark's own
connector does) that answer is used as it is: one request per micro-batch.

Tansu 0.6 answers with the base offset of the partition's *last record batch* + 1 (1000 records
produced in one batch over two partitions: ListOffsets says 1, the truth is 500). A source that trusts
that answer stalls short of the end of every partition, with no error. The high watermark a broker puts
in every Fetch response is right on both, so with ``endOffsetsFrom=fetch`` :class:`EndOffsetProbe`
assigns a consumer, for each non-empty partition whose ListOffsets answer changed, at
``max(ListOffsets - 1, log start)``, which lies inside the last batch, consumes until one record (or the
end-of-partition event) of each such partition arrived, and takes librdkafka's cached high watermark from
that fetch (for a read_committed client, where its end-of-partition event came: librdkafka's cached high
watermark is the high watermark whatever the isolation level). The result is never below the ListOffsets
answer.

The probe's consumer is created lazily (no network in ``__init__``), kept for the reader's life, fetches
small amounts, and is unassigned between probes. It carries ``kafka.group.id`` when the user set one, so
:meth:`EndOffsetProbe.commit` can mirror the query's progress to that group for lag tools; it never joins
the group (``assign()``, never ``subscribe()``).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable, Mapping

from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka import KafkaError as ClientError

from streamhydro.errors import KafkaConnectorError
from streamhydro.kafka.clients import build_client
from streamhydro.kafka.options import GROUP_ID, ISOLATION_LEVEL, READ_COMMITTED, ClientConfig, Subscription, isolation_level
from streamhydro.kafka.planning import TopicPartitionKey

log = logging.getLogger(__name__)

# The probe reads one record per partition: small fetches, no prefetching of whole partitions.
PROBE_CONSUMER_SETTINGS = {
    "enable.auto.commit": "false",
    "enable.auto.offset.store": "false",
    "enable.partition.eof": "true",
    "auto.offset.reset": "latest",
    "allow.auto.create.topics": "false",
    "max.partition.fetch.bytes": "65536",
    "fetch.max.bytes": "1048576",
    "queued.max.messages.kbytes": "1024",
    "fetch.wait.max.ms": "10",
}


class EndOffsetProbe:
    """Topic metadata, log start and true end offsets, and group commits, for one stream reader.

    ``use_fetch=False`` trusts ListOffsets (right on Apache Kafka); ``True`` reads ends from fetches (Tansu).
    ``timeout_s`` bounds each broker request and each probe; a request that fails is tried again, on a new
    client, for up to ``patience_s`` in all (a broker restarting or stalled for a while does not fail the
    query; Spark's own connector waits up to about three minutes too) before the error goes to Spark.
    """

    def __init__(self, client: ClientConfig, use_fetch: bool = False, timeout_s: float = 10.0, patience_s: float = 180.0) -> None:
        settings = client.with_defaults({GROUP_ID: f"streamhydro-probe-{uuid.uuid4().hex[:8]}"}).as_dict()
        settings.update({**PROBE_CONSUMER_SETTINGS, ISOLATION_LEVEL: isolation_level(client)})
        self._config = ClientConfig.of(settings)
        self._has_group = client.get(GROUP_ID) is not None
        self._read_committed = isolation_level(client) == READ_COMMITTED
        self._use_fetch = use_fetch
        self._timeout_s = timeout_s
        self._patience_s = patience_s
        self._consumer: Consumer | None = None
        # {tp: (ListOffsets answer, true end)}: appending always changes the ListOffsets answer (a new
        # batch on Tansu, a new high watermark on Kafka), so an unchanged answer means an unchanged end
        # and an idle stream polls without fetching.
        self._known: dict[TopicPartitionKey, tuple[int, int]] = {}

    @property
    def consumer(self) -> Consumer:
        if self._consumer is None:
            self._consumer = build_client(Consumer, self._config)
        return self._consumer

    def _patiently(self, request, what: str):
        """``request()``, tried again while it fails with a Kafka client error, for up to ``patience_s``."""
        deadline = time.monotonic() + self._patience_s
        while True:
            try:
                return request()
            except KafkaException as exc:
                if time.monotonic() > deadline:
                    raise KafkaConnectorError(
                        f"{what}: no answer from {self._config.get('bootstrap.servers')} for {self._patience_s:.0f} s: {exc}. "
                        "Fix: check kafka.bootstrap.servers and that the brokers are reachable"
                    ) from exc
                log.warning("%s: %s; trying again with a new client", what, exc)
                # A new client fetches metadata anew: after a broker restart librdkafka's cached metadata
                # can keep a partition unknown to the old one for minutes ("Unknown partition").
                self.close()
                time.sleep(1.0)

    def topic_partitions(self, subscription: Subscription) -> list[TopicPartitionKey]:
        """The partitions ``subscription`` names that exist now, from the broker's metadata."""
        metadata = self._patiently(lambda: self.consumer.list_topics(timeout=self._timeout_s), "topic metadata")
        counts = {
            name: len(topic.partitions)
            for name, topic in metadata.topics.items()
            if topic.error is None and not name.startswith("__")
        }
        return subscription.select(counts)

    def list_offsets(self, partitions: Iterable[TopicPartitionKey]) -> dict[TopicPartitionKey, tuple[int, int]]:
        """``{tp: (log start, ListOffsets(latest))}`` as the broker answers (wrong end on Tansu)."""
        answers = {}
        for topic, partition in partitions:
            tp = TopicPartition(topic, partition)
            answer = self._patiently(
                lambda tp=tp: self.consumer.get_watermark_offsets(tp, timeout=self._timeout_s, cached=False),
                f"{topic}[{partition}] offsets",
            )
            if answer is None:
                raise KafkaConnectorError(
                    f"{topic}[{partition}]: no offsets from the broker within {self._timeout_s} s. "
                    "Fix: check the broker is up and the partition has a leader"
                )
            answers[(topic, partition)] = (int(answer[0]), int(answer[1]))
        return answers

    def offset_ranges(self, partitions: Iterable[TopicPartitionKey]) -> dict[TopicPartitionKey, tuple[int, int]]:
        """``{tp: (log start, true end)}``: the end is the high watermark of a fetch (see module docstring)."""
        listed = self.list_offsets(partitions)
        if not self._use_fetch:
            return listed
        changed = {tp: (lo, hi) for tp, (lo, hi) in listed.items() if hi > lo and self._known.get(tp, (None,))[0] != hi}
        for tp, end in self._fetched_high_watermarks(changed).items():
            self._known[tp] = (listed[tp][1], end)
        return {tp: (lo, max(hi, self._known.get(tp, (hi, hi))[1])) for tp, (lo, hi) in listed.items()}

    def _fetched_high_watermarks(
        self, listed: Mapping[TopicPartitionKey, tuple[int, int]]
    ) -> dict[TopicPartitionKey, int]:
        if not listed:
            return {}
        consumer = self.consumer
        consumer.assign([TopicPartition(t, p, max(hi - 1, lo)) for (t, p), (lo, hi) in listed.items()])
        pending = set(listed)
        stable_at: dict[TopicPartitionKey, int] = {}
        deadline = time.monotonic() + self._timeout_s
        try:
            while pending and time.monotonic() < deadline:
                for message in consumer.consume(num_messages=1000, timeout=0.05):
                    tp = (message.topic(), message.partition())
                    error = message.error()
                    if error is not None and error.code() == ClientError._PARTITION_EOF:
                        stable_at[tp] = message.offset()
                    elif error is not None:
                        log.warning("end-offset probe: %s[%s]: %s", message.topic(), message.partition(), error)
                    elif self._read_committed:
                        continue  # a read_committed end is where the end-of-partition event comes
                    pending.discard(tp)
            ends = {}
            for topic, partition in listed:
                if (topic, partition) in pending:
                    continue
                if self._read_committed:
                    # librdkafka's cached high watermark is the high watermark even for read_committed
                    # (measured: tests/test_read_committed.py); the end-of-partition event is at the last stable offset.
                    ends[(topic, partition)] = stable_at[(topic, partition)]
                    continue
                _, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), cached=True)
                ends[(topic, partition)] = int(high)
        finally:
            consumer.unassign()
        if pending:
            log.warning(
                "end-offset probe: no fetch answer within %.1f s for %s; using ListOffsets for them this time "
                "(raise the probe timeout on a slow cluster)",
                self._timeout_s,
                sorted(pending),
            )
        return ends

    def commit(self, offsets: Mapping[TopicPartitionKey, int]) -> None:
        """Mirror processed offsets to ``kafka.group.id`` (a no-op without one)."""
        if not self._has_group or not offsets:
            return
        try:
            self.consumer.commit(
                offsets=[TopicPartition(t, p, off) for (t, p), off in offsets.items()], asynchronous=False
            )
        except KafkaException as exc:
            log.warning("could not mirror offsets to group %s: %s", self._config.get(GROUP_ID), exc)

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
