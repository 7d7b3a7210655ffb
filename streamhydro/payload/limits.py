"""Record sizes: nothing streamhydro writes can be refused by the producer for its size.

Runs in executor Python workers, at the end of a scoring task's output path
(:mod:`streamhydro.executor.scoring`), before the batches reach Spark's Kafka sink or streamhydro's
producer. Pure pyarrow/numpy, tested without Kafka.

A record the producer refuses fails the task, and every retry and restart fails on the same record: one
event would stop the service for good. So every output record is sized the way the producers size it
before it leaves the task:

- a **prediction** that would not fit becomes a dead letter (error class ``OutputTooLarge``), like any
  record that cannot be scored (:func:`refuse_oversized`);
- a **dead letter** that would not fit drops the fewest of its parts that make it fit, preferring value,
  then key, then the record's own headers (never the origin and error headers streamhydro adds), and says
  so in headers (:func:`fit_dead_letters`): ``streamhydro.dropped.<part>.bytes`` (the part's size) and
  ``streamhydro.dropped.<part>.sha256`` (hex digest of the dropped bytes; for headers, of their
  serialization in :func:`serialize_headers`), plus ``streamhydro.dropped.headers.count``.

Sizes (:func:`record_sizes`) are the Java producer's upper bound (``AbstractRecords.
estimateSizeInBytesUpperBound`` for record format v2: a 61-byte batch header, 21 bytes of record
overhead, varint lengths), which is above librdkafka's (``rd_kafka_msg_max_wire_size``: 36 bytes of
overhead plus key, value and headers): one conservative size for both producers. The limit per
connector is :func:`streamhydro.kafka.options.max_record_bytes`.
"""

from __future__ import annotations

import hashlib
import itertools
import struct

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from streamhydro.kafka import options
from streamhydro.payload import (
    HEADER_ORIGIN_TOPIC,
    HEADERS_TYPE,
    OUTPUT_ARROW_SCHEMA,
    OUTPUT_TOO_LARGE,
    Rejected,
    Rejections,
)

# DefaultRecordBatch.RECORD_BATCH_OVERHEAD and DefaultRecord.MAX_RECORD_OVERHEAD (Kafka's Java client).
BATCH_OVERHEAD = 61
RECORD_OVERHEAD = 21
# The smallest limit streamhydro runs with (checked with the configuration): every dead letter still fits
# once stripped, with its origin and error headers (a topic name of at most 249 bytes, a message of at most
# 300 characters) and the dropped-part headers.
MIN_RECORD_LIMIT = options.MIN_RECORD_LIMIT

HEADER_DROPPED_PREFIX = "streamhydro.dropped."
VALUE, KEY, HEADERS = "value", "key", "headers"
# Parts of a dead letter that may be dropped, in order of preference: the fewest parts that make it fit
# are dropped, the first in this order among equals.
DROP_ORDER = (VALUE, KEY, HEADERS)


def varint_sizes(lengths: np.ndarray) -> np.ndarray:
    """Bytes of Kafka's zig-zag varint for each length (-1, a null, takes 1 byte)."""
    zigzag = np.where(lengths < 0, 1, lengths.astype(np.int64) * 2)
    return 1 + sum((zigzag >= 1 << (7 * i)).astype(np.int64) for i in range(1, 5))


def _lengths(array: pa.Array) -> np.ndarray:
    """Byte lengths of a binary or string array, -1 for a null."""
    return pc.fill_null(pc.binary_length(array), -1).to_numpy(zero_copy_only=False).astype(np.int64)


def _field(sizes: np.ndarray) -> np.ndarray:
    """Bytes of a length-prefixed field of each size (a null is its 1-byte length alone)."""
    return np.where(sizes < 0, 1, varint_sizes(sizes) + sizes)


def record_sizes(batch: pa.RecordBatch) -> np.ndarray:
    """The size each record of ``batch`` (in ``OUTPUT_ARROW_SCHEMA``) counts for against the producer's limit."""
    n = batch.num_rows
    keys = _lengths(batch.column("key"))
    values = _lengths(batch.column("value"))
    headers = batch.column("headers")
    if headers.null_count:
        headers = pc.if_else(headers.is_null(), pa.scalar([], HEADERS_TYPE), headers)
    counts = pc.list_value_length(headers).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = pc.list_flatten(headers)
    per_header = _field(_lengths(flat.field("key"))) + _field(_lengths(flat.field("value")))
    ends = np.cumsum(counts)
    summed = np.concatenate([[0], np.cumsum(per_header)])
    header_bytes = summed[ends] - summed[ends - counts] if n else np.zeros(0, np.int64)
    return BATCH_OVERHEAD + RECORD_OVERHEAD + _field(keys) + _field(values) + varint_sizes(counts) + header_bytes


def refuse_oversized(
    predictions: pa.RecordBatch, meta: pa.RecordBatch | pa.Table, rejected: Rejected, limit: int
) -> tuple[pa.RecordBatch, Rejected]:
    """Predictions that fit ``limit``, and ``rejected`` with those that do not added as ``OutputTooLarge``.

    ``meta`` holds the input rows the encoder was given; ``predictions`` are those rows less ``rejected.rows``,
    in order (what :meth:`~streamhydro.payload.encoding.Encoder.predictions` returns). Positions in the
    returned Rejected are rows of ``meta``, for the dead letters.
    """
    sizes = record_sizes(predictions)
    over = np.flatnonzero(sizes > limit)
    if not len(over):
        return predictions, rejected
    scored = np.setdiff1d(np.arange(meta.num_rows), rejected.rows)
    rejections = Rejections()
    rejections.add_all(rejected, rejected.rows)
    for row, size in zip(scored[over].tolist(), sizes[over].tolist()):
        rejections.add(
            row,
            OUTPUT_TOO_LARGE,
            f"its prediction record is {size} bytes, over the producer's limit of {limit} bytes "
            "(kafka.client message.max.bytes / max.request.size)",
        )
    keep = np.ones(predictions.num_rows, bool)
    keep[over] = False
    return predictions.filter(pa.array(keep)), rejections.result()


def serialize_headers(headers: list[dict]) -> bytes:
    """The bytes ``streamhydro.dropped.headers.sha256`` is taken of: per header, the key's UTF-8 length
    (4 bytes big-endian) and bytes, then the value's length (-1 for null) and bytes."""
    out = bytearray()
    for header in headers:
        key = header["key"].encode("utf-8")
        out += struct.pack(">i", len(key)) + key
        value = header["value"]
        out += struct.pack(">i", -1) if value is None else struct.pack(">i", len(value)) + value
    return bytes(out)


def fit_dead_letters(batch: pa.RecordBatch, limit: int) -> pa.RecordBatch:
    """Dead letters (``OUTPUT_ARROW_SCHEMA``) with parts of those over ``limit`` dropped: the fewest of value,
    key and the record's own headers that make it fit, preferring them in that order (a 1.5 MB key goes, its
    small value stays); every dropped part is named in headers with its size and sha256. The origin and error
    headers are always kept."""
    sizes = record_sizes(batch)
    over = np.flatnonzero(sizes > limit)
    if not len(over):
        return batch
    keys = batch.column("key").to_pylist()
    values = batch.column("value").to_pylist()
    headers = batch.column("headers").to_pylist()
    for i in over.tolist():
        keys[i], values[i], headers[i] = _stripped(keys[i], values[i], headers[i] or [], limit)
    return pa.RecordBatch.from_arrays(
        [pa.array(keys, pa.binary()), pa.array(values, pa.binary()), batch.column("topic"), pa.array(headers, HEADERS_TYPE)],
        schema=OUTPUT_ARROW_SCHEMA,
    )


def _stripped(key: bytes | None, value: bytes | None, headers: list[dict], limit: int):
    # streamhydro appends its headers last, origin topic first: the last origin topic header starts them
    # (an input record may carry headers of the same names, a replayed dead letter's).
    names = [header["key"] for header in headers]
    own = len(names) - 1 - names[::-1].index(HEADER_ORIGIN_TOPIC) if HEADER_ORIGIN_TOPIC in names else len(names)
    copied, added = headers[:own], headers[own:]
    parts = {VALUE: value, KEY: key, HEADERS: serialize_headers(copied) if copied else None}
    droppable = [part for part in DROP_ORDER if parts[part] is not None]
    candidates = [drop for n in range(1, len(droppable) + 1) for drop in itertools.combinations(droppable, n)]
    for drop in candidates:
        kept_key = None if KEY in drop else key
        kept_value = None if VALUE in drop else value
        kept_headers = ([] if HEADERS in drop else copied) + added + [h for part in drop for h in _dropped(part, parts[part], len(copied))]
        if _size(kept_key, kept_value, kept_headers) <= limit or drop == candidates[-1]:
            return kept_key, kept_value, kept_headers
    return key, value, headers


def _dropped(part: str, data: bytes, header_count: int) -> list[dict]:
    named = [
        {"key": f"{HEADER_DROPPED_PREFIX}{part}.bytes", "value": str(len(data)).encode()},
        {"key": f"{HEADER_DROPPED_PREFIX}{part}.sha256", "value": hashlib.sha256(data).hexdigest().encode()},
    ]
    if part == HEADERS:
        named.append({"key": f"{HEADER_DROPPED_PREFIX}{HEADERS}.count", "value": str(header_count).encode()})
    return named


def _size(key: bytes | None, value: bytes | None, headers: list[dict]) -> int:
    batch = pa.RecordBatch.from_arrays(
        [pa.array([key], pa.binary()), pa.array([value], pa.binary()), pa.array([None], pa.string()), pa.array([headers], HEADERS_TYPE)],
        schema=OUTPUT_ARROW_SCHEMA,
    )
    return int(record_sizes(batch)[0])
