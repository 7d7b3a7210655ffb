"""Encoding: scored rows -> prediction records, bad records -> dead-letter records.

Runs in executor Python workers, once per model run of a scoring task (predictions) and once per
Arrow batch with bad records (dead letters). Both return batches in the sink's schema
``OUTPUT_ARROW_SCHEMA``.

Prediction values are compact UTF-8 JSON, built column-wise with Arrow string kernels::

    {"key": <input key as a JSON string, or null>,
     "prediction": <the model kind's prediction object, see streamhydro.payload.predictions>,
     "model": {"name": "...", "version": N},
     "source": {"topic": "...", "partition": P, "offset": O, "timestamp_ms": T},
     "idempotency_key": "<topic>/<partition>/<offset>"}

A key that is not valid UTF-8 cannot be a JSON string: such a record gets ``"key": null`` followed
by ``"key_base64": "<standard base64 of the key bytes>"``, so the output is always valid JSON and the
key bytes are recoverable; the Kafka key of the output record is the original bytes either way.
A float output that is NaN or infinite is written as ``null``.

A dead letter keeps the record's key, value and headers and adds its origin and error as headers
(``HEADER_*``); the value of a ``ValueTooLarge`` record is not copied (null), so that the dead
letter stays small enough for the producer: read it at its origin.
"""

from __future__ import annotations

import base64
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from streamhydro.errors import ModelError
from streamhydro.payload import (
    HEADER_ERROR_CLASS,
    HEADER_ERROR_EXCEPTION,
    HEADER_ERROR_MESSAGE,
    HEADER_ORIGIN_OFFSET,
    HEADER_ORIGIN_PARTITION,
    HEADER_ORIGIN_TIMESTAMP,
    HEADER_ORIGIN_TOPIC,
    HEADERS_TYPE,
    OUTPUT_ARROW_SCHEMA,
    VALUE_TOO_LARGE,
    Rejected,
    Rejections,
    isolate,
)
from streamhydro.payload.jsontext import json_string_body
from streamhydro.payload.predictions import prediction_for
from streamhydro.registry import Manifest


class Encoder:
    """Builds output records for scored rows and dead letters. Built once per session.

    ``outputs`` given to :meth:`predictions` are the model's manifest outputs by name, batch axis first.
    """

    def __init__(self, manifest: Manifest, output_topic: str, dead_letter_topic: str) -> None:
        self.manifest = manifest
        self.output_topic = output_topic
        self.dead_letter_topic = dead_letter_topic
        self.prediction = prediction_for(manifest)
        model = json.dumps({"name": manifest.name, "version": manifest.version}, separators=(",", ":"))
        self._model_part = ',"model":' + model + ',"source":{"topic":'

    def predictions(self, meta: pa.RecordBatch | pa.Table, outputs: dict[str, np.ndarray]) -> tuple[pa.RecordBatch, Rejected]:
        """Output records for scored rows, and the rows whose encoding raised (see ``isolate``).

        ``meta`` has the Kafka source columns of those rows, in order; a rejected row is meant for
        :meth:`dead_letters` with the same ``meta``. Outputs that do not match the manifest (a
        missing output, another number of rows or values per row) raise :class:`ModelError`:
        that is no record's fault.
        """
        n = meta.num_rows
        matrices = {spec.name: self._matrix(outputs, spec.name, spec.width, n) for spec in self.manifest.outputs}
        rejections = Rejections()
        parts = isolate(
            lambda lo, hi: self._predictions(meta.slice(lo, hi - lo), {k: v[lo:hi] for k, v in matrices.items()}),
            n,
            rejections,
        )
        if len(parts) == 1:
            return parts[0][1], rejections.result()
        table = pa.Table.from_batches([batch for _, batch in parts], schema=OUTPUT_ARROW_SCHEMA)
        columns = [column.combine_chunks() for column in table.columns]
        return pa.RecordBatch.from_arrays(columns, schema=OUTPUT_ARROW_SCHEMA), rejections.result()

    def _matrix(self, outputs: dict[str, np.ndarray], name: str, width: int, n: int) -> np.ndarray:
        label = f"{self.manifest.name}:{self.manifest.version}"
        if name not in outputs:
            raise ModelError(label, f"the run returned no output '{name}' (got {sorted(outputs)})")
        values = np.asarray(outputs[name])
        if values.ndim == 0 or values.shape[0] != n or values.size != n * width:
            raise ModelError(
                label, f"output '{name}' has shape {list(values.shape)} for {n} rows; the manifest says {width} value(s) per row"
            )
        return values.reshape(n, width)

    def _predictions(self, meta: pa.RecordBatch | pa.Table, outputs: dict[str, np.ndarray]) -> pa.RecordBatch:
        n = meta.num_rows
        keys = _column(meta, "key")
        topic = json_string_body(_column(meta, "topic").cast(pa.string()))
        partition = pc.cast(_column(meta, "partition"), pa.string())
        offset = pc.cast(_column(meta, "offset"), pa.string())
        parts: list[pa.Array | str] = ['{"key":', _key_json(keys), ',"prediction":', *self.prediction.parts(outputs)]
        parts += [self._model_part, '"', topic, '","partition":', partition, ',"offset":', offset]
        parts += [',"timestamp_ms":', _timestamp_ms_json(_column(meta, "timestamp")), '},"idempotency_key":"']
        parts += [topic, "/", partition, "/", offset, '"}']
        value = pc.binary_join_element_wise(*parts, "")
        return pa.RecordBatch.from_arrays(
            [
                keys.cast(pa.binary()),
                value.cast(pa.binary()),
                pa.array(np.full(n, self.output_topic, dtype=object), pa.string()),
                _headers(meta, n),
            ],
            schema=OUTPUT_ARROW_SCHEMA,
        )

    def dead_letters(self, batch: pa.RecordBatch | pa.Table, rejected: Rejected) -> pa.RecordBatch:
        """Dead-letter records for the rejected rows of ``batch``: origin and error added to the headers.

        ``batch`` has the Kafka source columns, ``value`` included. One Python step per bad row (bad
        rows are the exception, and each already cost a classification); nothing here depends on
        what the record holds, so nothing here raises for a record.
        """
        rows = pa.array(rejected.rows, pa.int64())
        meta = batch.take(rows)
        headers = _headers(meta, len(rows)).to_pylist()
        topics = _column(meta, "topic").to_pylist()
        partitions = _column(meta, "partition").to_pylist()
        offsets = _column(meta, "offset").to_pylist()
        stamps = _timestamp_ms(_column(meta, "timestamp")).to_pylist()
        for i, own in enumerate(headers):
            added = [
                (HEADER_ORIGIN_TOPIC, topics[i]),
                (HEADER_ORIGIN_PARTITION, partitions[i]),
                (HEADER_ORIGIN_OFFSET, offsets[i]),
                (HEADER_ORIGIN_TIMESTAMP, stamps[i]),
                (HEADER_ERROR_CLASS, rejected.error_classes[i]),
                (HEADER_ERROR_MESSAGE, rejected.messages[i]),
            ]
            if rejected.exceptions[i]:
                added.append((HEADER_ERROR_EXCEPTION, rejected.exceptions[i]))
            own.extend(
                {"key": key, "value": None if value is None else str(value).encode("utf-8", "backslashreplace")}
                for key, value in added
            )
        too_large = pa.array([error_class == VALUE_TOO_LARGE for error_class in rejected.error_classes], pa.bool_())
        values = _column(meta, "value").cast(pa.binary())
        return pa.RecordBatch.from_arrays(
            [
                _column(meta, "key").cast(pa.binary()),
                pc.if_else(too_large, pa.scalar(None, pa.binary()), values),
                pa.array([self.dead_letter_topic] * len(rows), pa.string()),
                pa.array(headers, HEADERS_TYPE),
            ],
            schema=OUTPUT_ARROW_SCHEMA,
        )


def _column(meta: pa.RecordBatch | pa.Table, name: str) -> pa.Array:
    column = meta.column(name)
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def _headers(meta: pa.RecordBatch | pa.Table, n: int) -> pa.Array:
    if "headers" not in meta.schema.names:
        return pa.array([[]] * n, HEADERS_TYPE)
    headers = _column(meta, "headers").cast(HEADERS_TYPE)
    if headers.null_count == 0:
        return headers
    return pc.if_else(headers.is_null(), pa.scalar([], HEADERS_TYPE), headers)


def _key_json(keys: pa.Array) -> pa.Array:
    """The JSON text after ``"key":`` for each key: a string, null, or null plus ``"key_base64"``."""
    binary = keys.cast(pa.binary())
    try:
        text = binary.cast(pa.string())
    except pa.ArrowInvalid:
        return _key_json_mixed(binary)
    quoted = pc.binary_join_element_wise('"', json_string_body(text), '"', "")
    return pc.fill_null(quoted, "null")


def _key_json_mixed(binary: pa.Array) -> pa.Array:
    """Slow path for a batch holding a key that is not valid UTF-8: one Python step per key."""
    out: list[str] = []
    for raw in binary.to_pylist():
        if raw is None:
            out.append("null")
            continue
        try:
            out.append(json.dumps(raw.decode("utf-8")))
        except UnicodeDecodeError:
            out.append('null,"key_base64":"' + base64.b64encode(raw).decode("ascii") + '"')
    return pa.array(out, pa.string())


def _timestamp_ms(stamps: pa.Array) -> pa.Array:
    if pa.types.is_timestamp(stamps.type):
        per_ms = {"s": None, "ms": 1, "us": 1000, "ns": 1_000_000}[stamps.type.unit]
        raw = stamps.cast(pa.timestamp(stamps.type.unit)).cast(pa.int64())
        return pc.multiply(raw, 1000) if per_ms is None else pc.divide(raw, per_ms)
    return stamps.cast(pa.int64())


def _timestamp_ms_json(stamps: pa.Array) -> pa.Array:
    return pc.fill_null(pc.cast(_timestamp_ms(stamps), pa.string()), "null")
