"""Throughput of streamhydro's Kafka connector through Spark. Runs on the driver, once per invocation.

    python benchmarks/kafka_connector.py --records 200000 --value-bytes 100 --partitions 3

Starts Apache Kafka (the jar cache) unless --bootstrap names a broker, fills a topic with confluent-kafka, then measures
(after a small warm-up of each path, so Python worker start-up is not counted):

- read: ``readStream`` with Trigger.AvailableNow into the ``noop`` sink, whole query wall time, and the
  time inside micro-batches (progress ``triggerExecution``);
- write: ``df.write`` of the same number of rows to a fresh topic, whole job wall time.

Prints one JSON line with rows/s for each.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid

from confluent_kafka import Producer

from streamhydro.brokers import ApacheKafkaBroker
from streamhydro.spark import Master, streaming_session
from streamhydro.kafka.admin import ensure_topics
from streamhydro.kafka.clients import build_client
from streamhydro.kafka.options import client_for
from streamhydro.kafka.source import FORMAT


def fill(bootstrap: str, topic: str, records: int, value_bytes: int) -> None:
    producer = build_client(Producer, client_for(bootstrap, {"linger.ms": "20", "batch.size": "1000000"}))
    value = b"x" * value_bytes
    for i in range(records):
        while True:
            try:
                producer.produce(topic, value, str(i).encode())
                break
            except BufferError:
                producer.poll(0.05)
    if producer.flush(120):
        raise SystemExit("could not fill the topic")


def read_all(spark, bootstrap: str, topic: str) -> tuple[int, float, float]:
    """Rows read, query wall seconds, and seconds inside micro-batches (without query start and stop)."""
    started = time.perf_counter()
    query = (
        spark.readStream.format(FORMAT)
        .option("kafka.bootstrap.servers", bootstrap)
        .option("subscribe", topic)
        .option("startingOffsets", "earliest")
        .load()
        .writeStream.format("noop")
        .trigger(availableNow=True)
        .start()
    )
    query.awaitTermination()
    seconds = time.perf_counter() - started
    in_batches = sum(p.durationMs.get("triggerExecution", 0) for p in query.recentProgress) / 1000
    return sum(p.numInputRows for p in query.recentProgress), seconds, in_batches


def write_all(spark, bootstrap: str, topic: str, records: int, value_bytes: int, partitions: int) -> float:
    frame = spark.range(records, numPartitions=partitions).selectExpr(
        "cast(id as string) as key", f"cast(repeat('x', {value_bytes}) as binary) as value"
    )
    frame.cache().count()
    started = time.perf_counter()
    frame.write.format(FORMAT).option("kafka.bootstrap.servers", bootstrap).option("topic", topic).mode("append").save()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--value-bytes", type=int, default=100)
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--bootstrap", help="an existing broker (default: start Apache Kafka locally)")
    args = parser.parse_args(argv)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

    broker = None if args.bootstrap else ApacheKafkaBroker().start()
    bootstrap = args.bootstrap or broker.bootstrap_servers
    try:
        run = uuid.uuid4().hex[:8]
        warm, source, sink, warm_sink = (f"bench-{run}-{name}" for name in ("warm", "in", "out", "warm-out"))
        ensure_topics(
            client_for(bootstrap),
            {warm: args.partitions, source: args.partitions, sink: args.partitions, warm_sink: args.partitions},
        )
        fill(bootstrap, warm, 1000, args.value_bytes)
        started = time.perf_counter()
        fill(bootstrap, source, args.records, args.value_bytes)
        fill_seconds = time.perf_counter() - started

        spark = streaming_session(Master.parse("local[2]"), "streamhydro-kafka-bench", {"spark.ui.enabled": "false"})
        spark.sparkContext.setLogLevel("ERROR")
        read_all(spark, bootstrap, warm)
        rows, read_seconds, batch_seconds = read_all(spark, bootstrap, source)
        write_all(spark, bootstrap, warm_sink, 1000, args.value_bytes, args.partitions)
        write_seconds = write_all(spark, bootstrap, sink, args.records, args.value_bytes, args.partitions)
        spark.stop()
    finally:
        if broker is not None:
            broker.stop()
    if rows != args.records:
        print(f"read {rows} rows, expected {args.records}", file=sys.stderr)
        return 1
    print(
        json.dumps(
            {
                "records": args.records,
                "value_bytes": args.value_bytes,
                "partitions": args.partitions,
                "broker": "local Apache Kafka" if broker is not None else args.bootstrap,
                "fill_rows_per_s": round(args.records / fill_seconds),
                "read_seconds": round(read_seconds, 2),
                "read_rows_per_s": round(args.records / read_seconds),
                "read_rows_per_s_in_batches": round(args.records / batch_seconds),
                "write_seconds": round(write_seconds, 2),
                "write_rows_per_s": round(args.records / write_seconds),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
