"""The Kafka sink through real Spark and a real broker; what it wrote is read back with kafka-python."""

from __future__ import annotations

import pytest
from kafka import KafkaProducer
from pyspark.errors import StreamingQueryException
from pyspark.sql import functions as F
from pyspark.sql.types import ArrayType, BinaryType, IntegerType, StringType, StructField, StructType

from conftest import client, read_all
from streamhydro.errors import ConfigError
from streamhydro.kafka.admin import ensure_topics
from streamhydro.kafka.records import HEADER_TYPE
from streamhydro.kafka.source import FORMAT

pytestmark = [pytest.mark.spark, pytest.mark.broker]

ROW_SCHEMA = StructType(
    [
        StructField("key", StringType()),
        StructField("value", BinaryType()),
        StructField("topic", StringType()),
        StructField("partition", IntegerType()),
        StructField("headers", ArrayType(HEADER_TYPE)),
    ]
)


def _writer(frame, bootstrap: str, **options):
    writer = frame.write.format(FORMAT).option("kafka.bootstrap.servers", bootstrap).mode("append")
    for key, value in options.items():
        writer = writer.option(key, str(value))
    return writer


def test_batch_write_routes_rows_with_keys_headers_and_partitions(spark, kafka_bootstrap, topic_name):
    first, second = f"{topic_name}-a", f"{topic_name}-b"
    ensure_topics(client(kafka_bootstrap), {first: 3, second: 1})
    rows = [
        (f"k{i}", f"v{i}".encode(), first if i % 2 else second, 2 if i % 2 else None, [(f"h{i}", b"x"), ("n", None)])
        for i in range(200)
    ]
    rows.append((None, b"bare", first, None, None))
    frame = spark.createDataFrame(rows, ROW_SCHEMA).repartition(2)

    _writer(frame, kafka_bootstrap).save()

    odd = read_all(kafka_bootstrap, first, 101)
    even = read_all(kafka_bootstrap, second, 100)
    assert len(odd) == 101 and len(even) == 100
    by_value = {r.value: r for r in odd + even}
    for i in (1, 2, 199):
        record = by_value[f"v{i}".encode()]
        assert record.topic == (first if i % 2 else second)
        assert record.key == f"k{i}".encode()
        assert record.headers == [(f"h{i}", b"x"), ("n", None)]
    assert {r.partition for r in odd if r.value != b"bare"} == {2}
    assert by_value[b"bare"].key is None and by_value[b"bare"].headers == []


def test_stream_write_copies_a_topic(spark, kafka_bootstrap, topic_name, tmp_path):
    source, target = f"{topic_name}-in", f"{topic_name}-out"
    ensure_topics(client(kafka_bootstrap), {source: 2, target: 2})
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    for i in range(500):
        producer.send(source, key=f"k{i}".encode(), value=f"v{i}".encode(), headers=[("i", str(i).encode())])
    producer.flush()
    producer.close()

    frame = (
        spark.readStream.format(FORMAT)
        .option("kafka.bootstrap.servers", kafka_bootstrap)
        .option("subscribe", source)
        .option("startingOffsets", "earliest")
        .load()
        .select("key", F.upper(F.col("value").cast("string")).alias("value"), "headers")
    )
    query = (
        frame.writeStream.format(FORMAT)
        .option("kafka.bootstrap.servers", kafka_bootstrap)
        .option("topic", target)
        .option("checkpointLocation", str(tmp_path / "cp"))
        .trigger(availableNow=True)
        .start()
    )
    query.awaitTermination(timeout=180)
    assert query.exception() is None
    assert sum(p.numInputRows for p in query.recentProgress) == 500

    copied = read_all(kafka_bootstrap, target, 500)
    assert sorted(r.value for r in copied) == sorted(f"V{i}".encode() for i in range(500))
    assert all(r.headers == [("i", r.key[1:])] for r in copied)


def test_record_too_large_fails_the_write_with_delivery_error(spark, kafka_bootstrap, topic_name):
    ensure_topics(client(kafka_bootstrap), {topic_name: 1})
    frame = spark.createDataFrame([(b"small",), (b"x" * 5000,)], "value binary").coalesce(1)

    with pytest.raises(Exception, match="DeliveryError") as info:
        _writer(frame, kafka_bootstrap, topic=topic_name, **{"kafka.message.max.bytes": 1000}).save()
    assert "too large" in str(info.value)


def test_broker_refusal_in_delivery_callback_fails_the_stream(spark, kafka_bootstrap, topic_name, tmp_path):
    """An invalid topic name is accepted by produce() and refused by the broker: the callback path."""
    frame = (
        spark.readStream.format("rate")
        .option("rowsPerSecond", 50)
        .load()
        .select(F.col("value").cast("string").alias("value"), F.lit("bad topic!").alias("topic"))
    )
    query = (
        frame.writeStream.format(FORMAT)
        .option("kafka.bootstrap.servers", kafka_bootstrap)
        .option("kafka.message.timeout.ms", 10_000)
        .option("checkpointLocation", str(tmp_path / "cp"))
        .trigger(processingTime="1 second")
        .start()
    )
    with pytest.raises(StreamingQueryException, match="DeliveryError") as info:
        query.awaitTermination(timeout=180)
    assert "nvalid topic" in str(info.value)
    assert not query.isActive


def test_sink_refuses_a_frame_without_topic_before_any_work(spark, kafka_bootstrap):
    frame = spark.createDataFrame([(b"v",)], "value binary")
    with pytest.raises(Exception, match="neither a topic column nor a topic option") as info:
        _writer(frame, kafka_bootstrap).save()
    assert ConfigError.__name__ in str(info.value)
