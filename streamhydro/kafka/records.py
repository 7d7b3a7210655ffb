"""Conversions between Kafka records and Arrow: the records a task reads and the results it produces.

Runs in executor Python workers, once per chunk of up to ~20k records. Pure functions over plain Python
lists and pyarrow arrays, tested without Spark or a broker. The Kafka client hands records over one
Python object each, so extracting their fields is one list comprehension per column; everything after
that is Arrow.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql.types import (
    ArrayType,
    BinaryType,
    IntegerType,
    LongType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

HEADER_TYPE = StructType([StructField("key", StringType()), StructField("value", BinaryType())])

# Spark's built-in Kafka source schema, headers included.
KAFKA_SCHEMA = StructType(
    [
        StructField("key", BinaryType()),
        StructField("value", BinaryType()),
        StructField("topic", StringType()),
        StructField("partition", IntegerType()),
        StructField("offset", LongType()),
        StructField("timestamp", TimestampType()),
        StructField("timestampType", IntegerType()),
        StructField("headers", ArrayType(HEADER_TYPE)),
    ]
)

ARROW_HEADER_TYPE = pa.struct([pa.field("key", pa.string()), pa.field("value", pa.binary())])

# KAFKA_SCHEMA in Arrow, as pyspark's to_arrow_schema(..., timezone="UTC") makes it: the records a task reads
# (streamhydro.kafka.reading) reach the scoring with the same columns as the rows of Spark's own Kafka source.
ARROW_SCHEMA = pa.schema(
    [
        pa.field("key", pa.binary()),
        pa.field("value", pa.binary()),
        pa.field("topic", pa.string()),
        pa.field("partition", pa.int32()),
        pa.field("offset", pa.int64()),
        pa.field("timestamp", pa.timestamp("us", tz="UTC")),
        pa.field("timestampType", pa.int32()),
        pa.field("headers", pa.list_(pa.field("element", ARROW_HEADER_TYPE))),
    ]
)

Header = tuple[str, bytes | None]


def headers_array(headers: Sequence[Sequence[Header] | None]) -> pa.ListArray:
    """Per-record header lists -> ``list<struct<key, value>>``; a record without headers is null (as Spark)."""
    lengths = np.fromiter((len(h) if h else 0 for h in headers), dtype=np.int32, count=len(headers))
    offsets = np.zeros(len(headers) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = list(chain.from_iterable(h for h in headers if h))
    keys = pa.array([k for k, _ in flat], type=pa.string())
    values = pa.array([v for _, v in flat], type=pa.binary())
    entries = pa.StructArray.from_arrays([keys, values], fields=list(ARROW_HEADER_TYPE))
    missing = pa.array(lengths == 0)
    return pa.ListArray.from_arrays(pa.array(offsets), entries, type=ARROW_SCHEMA.field("headers").type, mask=missing)


@dataclass(frozen=True)
class ConsumedColumns:
    """The fields of consumed records, one list per column, as taken from the Kafka client."""

    keys: Sequence[bytes | None]
    values: Sequence[bytes | None]
    topic: str
    partition: int
    offsets: Sequence[int]
    timestamp_types: Sequence[int]
    timestamps_ms: Sequence[int]
    headers: Sequence[Sequence[Header] | None]


def to_record_batch(columns: ConsumedColumns) -> pa.RecordBatch:
    """Consumed records of one topic-partition -> a RecordBatch of exactly ``ARROW_SCHEMA``.

    ``timestamp_types`` are librdkafka's (0 none, 1 create time, 2 log-append time); the column holds
    Kafka's Java ids as Spark does (-1, 0, 1).
    """
    n = len(columns.offsets)
    millis = np.asarray(columns.timestamps_ms, dtype=np.int64)
    return pa.RecordBatch.from_arrays(
        [
            pa.array(columns.keys, type=pa.binary()),
            pa.array(columns.values, type=pa.binary()),
            pa.repeat(pa.scalar(columns.topic, pa.string()), n),
            pa.array(np.full(n, columns.partition, dtype=np.int32)),
            pa.array(np.asarray(columns.offsets, dtype=np.int64)),
            pa.array(millis * 1000, type=pa.timestamp("us", tz="UTC")),
            pa.array(np.asarray(columns.timestamp_types, dtype=np.int32) - 1),
            headers_array(columns.headers),
        ],
        schema=ARROW_SCHEMA,
    )


def columns_of(messages: Sequence, topic: str, partition: int) -> ConsumedColumns:
    """Fields of confluent-kafka ``Message`` objects (data messages only) of one topic-partition."""
    stamps = [m.timestamp() for m in messages]
    return ConsumedColumns(
        keys=[m.key() for m in messages],
        values=[m.value() for m in messages],
        topic=topic,
        partition=partition,
        offsets=[m.offset() for m in messages],
        timestamp_types=[kind for kind, _ in stamps],
        timestamps_ms=[ms for _, ms in stamps],
        headers=[m.headers() for m in messages],
    )


# ---- producing -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutgoingRecords:
    """One batch of results as the producer takes it: a Python list per field."""

    topics: list[str]
    keys: list[bytes | None]
    values: list[bytes | None]
    headers: list[list[Header] | None]

    def __len__(self) -> int:
        return len(self.values)


def _column(batch: pa.RecordBatch, name: str) -> pa.Array | None:
    names = [n.lower() for n in batch.schema.names]
    return batch.column(names.index(name)) if name in names else None


def headers_lists(column: pa.Array) -> list[list[Header] | None]:
    """``list<struct<key, value>>`` -> per-row lists of ``(key, value)`` tuples (None for null or empty)."""
    lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False)
    entries = column.flatten()
    keys = entries.field("key").to_pylist()
    values = entries.field("value").to_pylist()
    bounds = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=bounds[1:])
    pairs = list(zip(keys, values, strict=True))
    return [pairs[a:b] or None for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)]


def outgoing(batch: pa.RecordBatch) -> OutgoingRecords:
    """Results (``topic`` and ``value`` columns, ``key`` and ``headers`` when present) -> producer arguments."""
    n = batch.num_rows
    key_column = _column(batch, "key")
    header_column = _column(batch, "headers")
    return OutgoingRecords(
        topics=_column(batch, "topic").to_pylist(),
        keys=key_column.to_pylist() if key_column is not None else [None] * n,
        values=_column(batch, "value").to_pylist(),
        headers=headers_lists(header_column) if header_column is not None else [None] * n,
    )
