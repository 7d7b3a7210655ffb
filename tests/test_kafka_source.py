"""The Kafka source through real Spark and a real broker, fed by kafka-python (the users' own client): the
offset ranges it plans (rows of ``RANGE_SCHEMA``), and the executor read loop that reads one range."""

from __future__ import annotations

import datetime as dt
import json
import time

import pytest
from confluent_kafka import Consumer, TopicPartition
from kafka import KafkaProducer
from pyspark.errors import StreamingQueryException

from conftest import client
from streamhydro.errors import DataLossError
from streamhydro.kafka import clients
from streamhydro.kafka.admin import ensure_topics
from streamhydro.kafka.offsets import EndOffsetProbe
from streamhydro.kafka.planning import OffsetRange
from streamhydro.kafka.ranges import range_records
from streamhydro.kafka.reading import read_range, reader_config
from streamhydro.kafka.records import ARROW_SCHEMA
from streamhydro.kafka.source import FORMAT
from streamhydro.metrics.listener import kafka_lag


def with_spark(test):
    """Spark and broker tests; the read-loop tests at the end need the broker only."""
    return pytest.mark.spark(pytest.mark.broker(test))


# Producer timestamps from now: records older than the broker's retention (7 days) are deleted by its first
# retention check (30 s after it starts, then every 5 minutes), which moves the log start to the end.
BASE_MS = int(time.time()) * 1000
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


def _produce(bootstrap: str, topic: str, count: int, partitions: int, start: int = 0, one_batch: bool = False) -> None:
    """``count`` records with key, value, headers and a producer timestamp; record i goes to partition i % n.

    Record ``start`` has neither key nor headers. ``one_batch`` packs each partition's records into a single
    record batch (what makes Tansu's ListOffsets answer wrong by the most).
    """
    batching = {"linger_ms": 5000, "batch_size": 16 * 1024 * 1024} if one_batch else {}
    producer = KafkaProducer(bootstrap_servers=bootstrap, **batching)
    for i in range(start, start + count):
        bare = i == start
        producer.send(
            topic,
            value=f"value-{i}".encode(),
            key=None if bare else f"key-{i}".encode(),
            headers=[] if bare else [("i", str(i).encode()), ("kind", b"test")],
            partition=i % partitions,
            timestamp_ms=BASE_MS + i,
        )
    producer.flush(timeout=30)
    producer.close()


def _stream(spark, bootstrap: str, topic: str, **options):
    reader = (
        spark.readStream.format(FORMAT)
        .option("kafka.bootstrap.servers", bootstrap)
        .option("subscribe", topic)
        .option("startingOffsets", "earliest")
    )
    for key, value in options.items():
        reader = reader.option(key, str(value))
    return reader.load()


def _available_now(spark, frame, name: str, checkpoint) -> tuple[list, object]:
    query = (
        frame.writeStream.format("memory")
        .queryName(name)
        .option("checkpointLocation", str(checkpoint))
        .trigger(availableNow=True)
        .start()
    )
    query.awaitTermination(timeout=180)
    if query.exception() is not None:
        raise AssertionError(f"query failed: {query.exception()}")
    return spark.sql(f"select * from {name}").collect(), query


def _offsets(ranges) -> list[tuple[str, int, int]]:
    """Every (topic, partition, offset) the planned ``ranges`` hold, sorted, repeats kept."""
    return sorted((r.topic, r.partition, offset) for r in ranges for offset in range(r.from_offset, r.until_offset))


@with_spark
def test_stream_plans_one_range_per_partition_covering_every_offset_once(spark, kafka_bootstrap, topic_name, tmp_path):
    ensure_topics(client(kafka_bootstrap), {topic_name: 3})
    _produce(kafka_bootstrap, topic_name, 3000, partitions=3)

    rows, _ = _available_now(spark, _stream(spark, kafka_bootstrap, topic_name), "read_all", tmp_path / "cp")

    assert sorted(tuple(r) for r in rows) == [(topic_name, p, 0, 1000) for p in range(3)]
    assert _offsets(rows) == sorted((topic_name, i % 3, i // 3) for i in range(3000))
    schema = spark.sql("select * from read_all").schema.simpleString()
    assert schema == "struct<topic:string,partition:int,from_offset:bigint,until_offset:bigint>"


@with_spark
def test_max_offsets_per_trigger_splits_into_batches(spark, kafka_bootstrap, topic_name, tmp_path):
    ensure_topics(client(kafka_bootstrap), {topic_name: 3})
    _produce(kafka_bootstrap, topic_name, 600, partitions=3)

    frame = _stream(spark, kafka_bootstrap, topic_name, maxOffsetsPerTrigger=250)
    rows, query = _available_now(spark, frame, "limited", tmp_path / "cp")

    progress = [p for p in (json_progress(p) for p in query.recentProgress) if p["numInputRows"]]
    # Records per micro-batch from its offsets (Spark counts a range as one input row); the first has no
    # start offsets, and the metrics' lag counts a partition without one from 0.
    sizes = [sum(kafka_lag(p["sources"][0]["endOffset"], p["sources"][0]["startOffset"]).values()) for p in progress]
    assert _offsets(rows) == sorted((topic_name, i % 3, i // 3) for i in range(600))
    assert len(sizes) >= 3
    assert max(sizes) <= 250
    assert sum(sizes) == 600
    first = progress[0]["sources"][0]
    assert sum(first["endOffset"][topic_name].values()) == sizes[0]
    assert sum(first["latestOffset"][topic_name].values()) == 600, "reportLatestOffset gives the true ends (for lag)"


def json_progress(progress) -> dict:
    return json.loads(progress.json)


@with_spark
@pytest.mark.parametrize("broker", ["tansu", "kafka"])
def test_end_offsets_from_fetch_do_not_stall_where_list_offsets_is_wrong(spark, request, broker, topic_name, tmp_path):
    """Tansu answers ListOffsets(latest) with the last batch's base offset + 1; Apache Kafka with the log end.

    ``endOffsetsFrom=fetch`` reads everything on both; trusting ListOffsets (the default, as Spark's own
    connector does) is right on Apache Kafka and stalls short of the end on Tansu.
    """
    kafka_bootstrap = request.getfixturevalue(f"{broker}_bootstrap")
    ensure_topics(client(kafka_bootstrap), {topic_name: 2})
    _produce(kafka_bootstrap, topic_name, 1000, partitions=2, one_batch=True)

    probe = EndOffsetProbe(client(kafka_bootstrap), use_fetch=True)
    partitions = [(topic_name, 0), (topic_name, 1)]
    listed = {tp: hi for tp, (_, hi) in probe.list_offsets(partitions).items()}
    true_ends = {tp: hi for tp, (_, hi) in probe.offset_ranges(partitions).items()}
    assert true_ends == {(topic_name, 0): 500, (topic_name, 1): 500}
    assert {tp: hi for tp, (_, hi) in probe.offset_ranges(partitions).items()} == true_ends, "cached, unchanged"

    trusting, _ = _available_now(spark, _stream(spark, kafka_bootstrap, topic_name), f"trusting_{broker}", tmp_path / "a")
    probing, _ = _available_now(
        spark, _stream(spark, kafka_bootstrap, topic_name, endOffsetsFrom="fetch"), f"probing_{broker}", tmp_path / "b"
    )

    assert range_records(probing) == 1000
    _produce(kafka_bootstrap, topic_name, 10, partitions=2, start=1000)
    moved = {tp: hi for tp, (_, hi) in probe.offset_ranges(partitions).items()}
    probe.close()
    assert moved == {(topic_name, 0): 505, (topic_name, 1): 505}
    if broker == "tansu":
        assert all(listed[tp] < 500 for tp in partitions), f"Tansu's ListOffsets is no longer wrong: {listed}"
        assert range_records(trusting) == sum(listed.values()) < 1000
    else:
        assert listed == true_ends
        assert range_records(trusting) == 1000


@with_spark
def test_restart_from_checkpoint_reads_everything_once(spark, kafka_bootstrap, topic_name, tmp_path):
    ensure_topics(client(kafka_bootstrap), {topic_name: 2})
    _produce(kafka_bootstrap, topic_name, 600, partitions=2)
    checkpoint, output = tmp_path / "cp", tmp_path / "out"

    def start(frame, **trigger):
        return (
            frame.writeStream.format("parquet")
            .option("path", str(output))
            .option("checkpointLocation", str(checkpoint))
            .trigger(**trigger)
            .start()
        )

    first = start(_stream(spark, kafka_bootstrap, topic_name, maxOffsetsPerTrigger=100), processingTime="0 seconds")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done = [json_progress(p) for p in first.recentProgress if p.numInputRows]
        if len(done) >= 2:
            break
        time.sleep(0.2)
    first.stop()
    committed_before = [json_progress(p)["sources"][0]["endOffset"] for p in first.recentProgress if p.numInputRows]
    assert committed_before, "the first run made no progress"
    _produce(kafka_bootstrap, topic_name, 400, partitions=2, start=600)

    second = start(_stream(spark, kafka_bootstrap, topic_name), availableNow=True)
    second.awaitTermination(timeout=180)
    assert second.exception() is None

    resumed_from = json_progress(second.recentProgress[0])["sources"][0]["startOffset"]
    assert {t: {p: int(o) for p, o in parts.items()} for t, parts in resumed_from.items()} in committed_before
    rows = spark.read.parquet(str(output)).collect()
    assert _offsets(rows) == sorted((topic_name, i % 2, i // 2) for i in range(1000))


@with_spark
def test_data_loss_fails_the_query_unless_allowed(spark, kafka_bootstrap, topic_name, tmp_path):
    """Starting past the end of a partition looks like truncated records: DataLossError by default, after the
    planner re-checked the end for half the read timeout (4 s here: 2 s)."""
    ensure_topics(client(kafka_bootstrap), {topic_name: 1})
    _produce(kafka_bootstrap, topic_name, 10, partitions=1)
    beyond = {"startingOffsets": f'{{"{topic_name}": {{"0": 50}}}}', "kafkaConsumer.pollTimeoutMs": 4000}

    with pytest.raises(StreamingQueryException, match="DataLossError"):
        _available_now(
            spark, _stream(spark, kafka_bootstrap, topic_name, **beyond), "lost", tmp_path / "a"
        )

    tolerant = _stream(spark, kafka_bootstrap, topic_name, **beyond, failOnDataLoss="false")
    rows, query = _available_now(spark, tolerant, "tolerated", tmp_path / "b")
    assert rows == []
    assert json_progress(query.lastProgress)["sources"][0]["endOffset"] == {topic_name: {"0": 10}}


@with_spark
def test_pattern_picks_up_new_topics_and_mirrors_offsets_to_group(spark, kafka_bootstrap, topic_name, tmp_path):
    first, second = f"{topic_name}-a", f"{topic_name}-b"
    group = f"{topic_name}-group"
    ensure_topics(client(kafka_bootstrap), {first: 1})
    _produce(kafka_bootstrap, first, 10, partitions=1)
    frame = (
        spark.readStream.format(FORMAT)
        .option("kafka.bootstrap.servers", kafka_bootstrap)
        .option("subscribePattern", f"{topic_name}-.*")
        .option("startingOffsets", "latest")
        .option("kafka.group.id", group)
        .load()
    )
    query = (
        frame.writeStream.format("memory")
        .queryName("pattern")
        .option("checkpointLocation", str(tmp_path / "cp"))
        .trigger(processingTime="0 seconds")
        .start()
    )
    try:
        _wait_for(lambda: query.lastProgress is not None, "the first micro-batch")
        ensure_topics(client(kafka_bootstrap), {second: 2})
        _produce(kafka_bootstrap, second, 20, partitions=2)
        _wait_for(lambda: range_records(spark.sql("select * from pattern").collect()) >= 20, "ranges of the new topic")
        _wait_for(lambda: _committed(kafka_bootstrap, group, second) == [10, 10], "offsets committed to the group")
    finally:
        query.stop()
    rows = spark.sql("select * from pattern").collect()
    assert _offsets(rows) == sorted((second, i % 2, i // 2) for i in range(20))


def _committed(bootstrap: str, group: str, topic: str) -> list[int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        return [
            tp.offset for tp in consumer.committed([TopicPartition(topic, 0), TopicPartition(topic, 1)], timeout=10)
        ]
    finally:
        consumer.close()


def _wait_for(condition, what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.mark.broker
def test_read_range_reads_exactly_and_reports_truncation(kafka_bootstrap, topic_name):
    """The executor read loop alone: exact ranges in bounded chunks; a range past the end is data loss."""
    ensure_topics(client(kafka_bootstrap), {topic_name: 1})
    _produce(kafka_bootstrap, topic_name, 250, partitions=1)
    consumer = clients.consumer(reader_config(client(kafka_bootstrap)))

    batches = list(read_range(consumer, OffsetRange(topic_name, 0, 17, 230), True, 10_000, batch_rows=100))
    offsets = [o for b in batches for o in b.column("offset").to_pylist()]
    assert offsets == list(range(17, 230))
    assert max(b.num_rows for b in batches) <= 100

    with pytest.raises(DataLossError, match=r"ends at 250"):
        list(read_range(consumer, OffsetRange(topic_name, 0, 240, 260), True, 10_000))
    tolerated = list(read_range(consumer, OffsetRange(topic_name, 0, 240, 260), False, 10_000))
    assert [o for b in tolerated for o in b.column("offset").to_pylist()] == list(range(240, 250))


@pytest.mark.broker
def test_a_read_range_has_the_columns_of_sparks_kafka_source(kafka_bootstrap, topic_name):
    """What a task reads: each record of its range with key, value, topic, partition, offset, timestamp and
    headers; a record without key or headers has nulls there, as in Spark's own source."""
    ensure_topics(client(kafka_bootstrap), {topic_name: 3})
    _produce(kafka_bootstrap, topic_name, 30, partitions=3)
    consumer = clients.consumer(reader_config(client(kafka_bootstrap)))

    batches = [b for p in range(3) for b in read_range(consumer, OffsetRange(topic_name, p, 0, 10), True, 10_000)]
    assert all(b.schema.equals(ARROW_SCHEMA) for b in batches)
    by_value = {row["value"]: row for b in batches for row in b.to_pylist()}
    assert set(by_value) == {f"value-{i}".encode() for i in range(30)}
    for i in (0, 1, 14, 29):
        row = by_value[f"value-{i}".encode()]
        assert (row["topic"], row["partition"], row["offset"]) == (topic_name, i % 3, i // 3)
        assert row["timestampType"] == 0
        assert row["timestamp"] == EPOCH + dt.timedelta(milliseconds=BASE_MS + i)
        if i == 0:
            assert row["key"] is None and row["headers"] is None
        else:
            assert row["key"] == f"key-{i}".encode()
            assert row["headers"] == [{"key": "i", "value": str(i).encode()}, {"key": "kind", "value": b"test"}]
