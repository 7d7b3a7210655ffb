"""Payload codecs: Kafka record values -> model inputs (:mod:`.formats`, one module per
``PayloadFormat``; :mod:`.fields` turns event fields into typed inputs for all of them), predictions
and dead letters -> output records (:mod:`.encoding`); this module holds what they share.

Imported in executor Python workers (the scoring tasks) and on the driver (model checks). Pure
pyarrow/numpy: no Spark, no ONNX Runtime, so the codecs are tested with plain Arrow arrays.

Every record gets exactly one outcome: a prediction or a dead letter. A record the codecs can
name a problem for is rejected with an error class from the small fixed vocabulary
``ERROR_CLASSES`` (a metric label and a dead-letter header) and a message. The last-resort guard
:func:`isolate` turns any other exception raised while coding one record into an
``UnexpectedError`` rejection of that record alone, with the exception's type and message; the
rest of its batch goes on.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import pyarrow as pa

from streamhydro.errors import SchemaRegistryError

log = logging.getLogger(__name__)

T = TypeVar("T")



class PayloadFormat(enum.StrEnum):
    """How record values are encoded (``payload.format``); one module of :mod:`.formats` each."""

    JSON = "json"  # one JSON object per record
    AVRO = "avro"  # Avro binary: Confluent wire format with a schema registry, or bare with a fixed schema
    PROTOBUF = "protobuf"  # Protobuf: Confluent wire format with a schema registry, or bare with a fixed schema
    TENSOR = "tensor"  # the raw little-endian float32 row of a single-input model


# Error classes of bad records: a fixed vocabulary, used as a metric label and a dead-letter header.
EMPTY_VALUE = "EmptyValue"  # null, empty or whitespace-only value
VALUE_TOO_LARGE = "ValueTooLarge"  # a value over payload.max_value_bytes; not parsed, not copied
INVALID_JSON = "InvalidJson"  # not parseable as JSON (truncated, nested too deeply, model text not UTF-8...)
NOT_AN_OBJECT = "NotAnObject"  # valid JSON, but an array, number or string instead of an object
MULTIPLE_OBJECTS = "MultipleObjects"  # more than one JSON value in one record
NOT_WIRE_FORMAT = "NotWireFormat"  # avro/protobuf with a registry: no magic byte 0 or shorter than the header
UNKNOWN_SCHEMA = "UnknownSchema"  # the schema id in the header is not in the registry (it answered 404)
INVALID_AVRO = "InvalidAvro"  # the body does not decode with its Avro schema, or leaves bytes over
INVALID_PROTOBUF = "InvalidProtobuf"  # the body (or its message indexes) does not parse as the schema's message
MISSING_FEATURE = "MissingFeature"  # a feature (or array input) is absent or null
WRONG_TYPE = "WrongType"  # a field's type does not fit the input's dtype (a string for a number...)
WRONG_LENGTH = "WrongLength"  # an array input does not hold exactly `width` values
WRONG_TENSOR_LENGTH = "WrongTensorLength"  # a tensor value is not exactly width * 4 bytes
NON_FINITE = "NonFinite"  # NaN, Infinity, or a number too large for the input's dtype
UNEXPECTED_ERROR = "UnexpectedError"  # coding this record raised an exception no check foresaw
OUTPUT_TOO_LARGE = "OutputTooLarge"  # its prediction record is over the producer's size limit (payload.limits)
ERROR_CLASSES = (
    EMPTY_VALUE,
    VALUE_TOO_LARGE,
    INVALID_JSON,
    NOT_AN_OBJECT,
    MULTIPLE_OBJECTS,
    NOT_WIRE_FORMAT,
    UNKNOWN_SCHEMA,
    INVALID_AVRO,
    INVALID_PROTOBUF,
    MISSING_FEATURE,
    WRONG_TYPE,
    WRONG_LENGTH,
    WRONG_TENSOR_LENGTH,
    NON_FINITE,
    UNEXPECTED_ERROR,
    OUTPUT_TOO_LARGE,
)

# Dead-letter headers added to a bad record's own headers.
HEADER_ORIGIN_TOPIC = "streamhydro.origin.topic"
HEADER_ORIGIN_PARTITION = "streamhydro.origin.partition"
HEADER_ORIGIN_OFFSET = "streamhydro.origin.offset"
HEADER_ORIGIN_TIMESTAMP = "streamhydro.origin.timestamp"
HEADER_ERROR_CLASS = "streamhydro.error.class"
HEADER_ERROR_MESSAGE = "streamhydro.error.message"
HEADER_ERROR_EXCEPTION = "streamhydro.error.exception"  # UnexpectedError only: module.QualifiedName

HEADERS_TYPE = pa.list_(pa.struct([("key", pa.string()), ("value", pa.binary())]))
OUTPUT_ARROW_SCHEMA = pa.schema(
    [("key", pa.binary()), ("value", pa.binary()), ("topic", pa.string()), ("headers", HEADERS_TYPE)]
)

MESSAGE_LIMIT = 300


@dataclasses.dataclass(frozen=True)
class Rejected:
    """Records of one batch that get a dead letter instead of a prediction.

    ``rows`` are ascending positions in the batch; ``error_classes[i]`` (one of ``ERROR_CLASSES``),
    ``messages[i]`` and ``exceptions[i]`` describe row ``rows[i]``. ``exceptions[i]`` is the type of
    the exception behind an ``UnexpectedError`` (``module.QualifiedName``), empty for the others.
    """

    rows: np.ndarray
    error_classes: tuple[str, ...]
    messages: tuple[str, ...]
    exceptions: tuple[str, ...]


class Rejections:
    """Collects the rejected records of one batch, in any order; :meth:`result` sorts them."""

    def __init__(self) -> None:
        self._rows: list[tuple[int, str, str, str]] = []

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, position: int, error_class: str, message: str, exception: str = "") -> None:
        self._rows.append((int(position), error_class, message[:MESSAGE_LIMIT], exception))

    def add_unexpected(self, position: int, exc: Exception) -> None:
        kind = type(exc)
        self.add(position, UNEXPECTED_ERROR, str(exc) or kind.__qualname__, f"{kind.__module__}.{kind.__qualname__}")

    def add_all(self, rejected: Rejected, positions: np.ndarray) -> None:
        """Add the rejections of a part of the batch; ``positions[i]`` is the batch position of ``rejected.rows[i]``."""
        for position, *why in zip(np.asarray(positions).tolist(), rejected.error_classes, rejected.messages, rejected.exceptions, strict=True):
            self._rows.append((position, *why))

    def result(self) -> Rejected:
        rows = sorted(self._rows)
        return Rejected(
            rows=np.array([r[0] for r in rows], dtype=np.int64),
            error_classes=tuple(r[1] for r in rows),
            messages=tuple(r[2] for r in rows),
            exceptions=tuple(r[3] for r in rows),
        )


def isolate(run: Callable[[int, int], T], n: int, rejections: Rejections) -> list[tuple[int, T]]:
    """The codecs' last-resort guard: ``run(lo, hi)`` over the records [lo, hi) of a batch of ``n``.

    Where ``run`` raises, the range is split in halves until the record that raises stands alone;
    that record is rejected as ``UnexpectedError`` and the others are run again without it
    (O(log n) extra runs per such record, none when nothing raises). Returns ``(lo, result)`` for
    each range that ran, in order. ``MemoryError`` and a schema registry that cannot answer are the
    worker's problem, not a record's: they propagate, the task fails and Spark retries it; so does
    an exception on an empty batch.
    """
    done: list[tuple[int, T]] = []

    def attempt(lo: int, hi: int) -> None:
        try:
            done.append((lo, run(lo, hi)))
            return
        except (MemoryError, SchemaRegistryError):
            raise
        except Exception as exc:
            if hi - lo == 0:
                raise
            if hi - lo == 1:
                log.warning(
                    "record %d of its batch raised %s: rejected as %s", lo, type(exc).__name__, UNEXPECTED_ERROR, exc_info=exc
                )
                rejections.add_unexpected(lo, exc)
                return
        mid = (lo + hi) // 2
        attempt(lo, mid)
        attempt(mid, hi)

    attempt(0, n)
    return done
