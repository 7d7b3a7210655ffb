"""Payload codecs: Kafka record values -> model input arrays, and predictions -> output records.

Runs in executor Python workers, once per Arrow batch of a scoring task (and on the driver when a
model is validated). Pure pyarrow/numpy: no Spark, no ONNX Runtime, so every function here is
tested with plain Arrow arrays.

Two payload kinds (``PAYLOADS``):

* ``json``: one JSON object per record. For every model input (:class:`TensorSpec`) with
  ``features``, each feature is a numeric field and the input's columns follow the feature order;
  an input without ``features`` is one field named like the input, holding a list of ``width``
  numbers. Other fields are ignored.
* ``tensor``: the record value is the raw little-endian float32 row of a single-input model,
  exactly ``width * 4`` bytes.

Decoding is vectorized: the values of a batch are joined into one newline-delimited buffer and
parsed by ``pyarrow.json.read_json`` with an explicit schema; feature matrices are numpy views over
the parsed columns. When a block does not parse, or yields a different number of rows than it
has records, it is split in halves until the bad records are isolated (O(bad * log n) parses, no
per-record loop over good records); each isolated record is then classified once.

Bad records get an error class from the small fixed vocabulary ``ERROR_CLASSES`` (metrics label
by it) and a message naming the problem.

Output values are compact UTF-8 JSON, built column-wise with Arrow string kernels::

    {"key": <input key as a JSON string, or null>,
     "prediction": {"label": "<labels[argmax]>", "scores": {"<label>": <float>, ...}},
     "model": {"name": "...", "version": N},
     "source": {"topic": "...", "partition": P, "offset": O, "timestamp_ms": T},
     "idempotency_key": "<topic>/<partition>/<offset>"}

A key that is not valid UTF-8 cannot be a JSON string: such a record gets ``"key": null`` followed
by ``"key_base64": "<standard base64 of the key bytes>"``, so the output is always valid JSON and the
key bytes are recoverable; the Kafka key of the output record is the original bytes either way.
A score that is NaN or infinite is written as ``null``.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json

from streamhydro.errors import ModelError
from streamhydro.registry import Manifest, TensorSpec

PAYLOAD_JSON = "json"
PAYLOAD_TENSOR = "tensor"
PAYLOADS = (PAYLOAD_JSON, PAYLOAD_TENSOR)

# Error classes of bad records: a fixed vocabulary, used as a metric label and a dead-letter header.
EMPTY_VALUE = "EmptyValue"  # null, empty or whitespace-only value
INVALID_JSON = "InvalidJson"  # not parseable as JSON (truncated, not UTF-8, duplicate field...)
NOT_AN_OBJECT = "NotAnObject"  # valid JSON, but an array, number or string instead of an object
MULTIPLE_OBJECTS = "MultipleObjects"  # more than one JSON value in one record
MISSING_FEATURE = "MissingFeature"  # a feature (or list input) is absent or null
WRONG_TYPE = "WrongType"  # a feature is not a number, or a list input is not a list of numbers
WRONG_LENGTH = "WrongLength"  # a list input does not hold exactly `width` numbers
WRONG_TENSOR_LENGTH = "WrongTensorLength"  # a tensor value is not exactly width * 4 bytes
NON_FINITE = "NonFinite"  # NaN, Infinity, or a number too large for a double
ERROR_CLASSES = (
    EMPTY_VALUE,
    INVALID_JSON,
    NOT_AN_OBJECT,
    MULTIPLE_OBJECTS,
    MISSING_FEATURE,
    WRONG_TYPE,
    WRONG_LENGTH,
    WRONG_TENSOR_LENGTH,
    NON_FINITE,
)

# Dead-letter headers added to a bad record's own headers.
HEADER_ORIGIN_TOPIC = "streamhydro.origin.topic"
HEADER_ORIGIN_PARTITION = "streamhydro.origin.partition"
HEADER_ORIGIN_OFFSET = "streamhydro.origin.offset"
HEADER_ORIGIN_TIMESTAMP = "streamhydro.origin.timestamp"
HEADER_ERROR_CLASS = "streamhydro.error.class"
HEADER_ERROR_MESSAGE = "streamhydro.error.message"

HEADERS_TYPE = pa.list_(pa.struct([("key", pa.string()), ("value", pa.binary())]))
OUTPUT_ARROW_SCHEMA = pa.schema(
    [("key", pa.binary()), ("value", pa.binary()), ("topic", pa.string()), ("headers", HEADERS_TYPE)]
)

_MESSAGE_LIMIT = 300
_SLICE_END = 2**31 - 1
_MIN_BLOCK = 1 << 16


@dataclasses.dataclass(frozen=True)
class Decoded:
    """The result of decoding one batch of record values.

    ``inputs`` maps each model input name to an array of the good rows, shaped like the input
    (batch axis first) and typed like it. ``good`` and ``bad`` are ascending row positions in the
    decoded batch; ``error_classes[i]`` and ``error_messages[i]`` describe row ``bad[i]``.
    """

    inputs: dict[str, np.ndarray]
    good: np.ndarray
    bad: np.ndarray
    error_classes: tuple[str, ...]
    error_messages: tuple[str, ...]


class Decoder:
    """Decodes record values for one model's inputs. Built once per session; cheap to call.

    Raises :class:`ModelError` at construction when the manifest cannot be fed from ``payload``.
    """

    def __init__(self, manifest: Manifest, payload: str) -> None:
        check_payload_fits(manifest, payload)
        self.manifest = manifest
        self.payload = payload
        fields: list[pa.Field] = []
        for spec in manifest.inputs:
            if spec.features:
                fields.extend(pa.field(name, pa.float64()) for name in spec.features)
            else:
                fields.append(pa.field(spec.name, pa.list_(pa.float64())))
        self._parse_options = pa_json.ParseOptions(
            explicit_schema=pa.schema(fields), unexpected_field_behavior="ignore"
        )

    def decode(self, values: pa.Array) -> Decoded:
        """Decode a binary array of record values (nulls allowed)."""
        if self.payload == PAYLOAD_TENSOR:
            return self._decode_tensor(values)
        return self._decode_json(values)

    def _decode_tensor(self, values: pa.Array) -> Decoded:
        spec = self.manifest.inputs[0]
        expected = spec.width * 4
        lengths = pc.fill_null(pc.binary_length(values), -1).to_numpy(zero_copy_only=False)
        ok = lengths == expected
        good_values = values.filter(pa.array(ok))
        rows = _float32_rows(good_values, spec.width)
        errors = _Errors()
        for position in np.flatnonzero(~ok):
            got = int(lengths[position])
            if got <= 0:
                errors.add(int(position), EMPTY_VALUE, "record value is null or empty")
            else:
                errors.add(
                    int(position),
                    WRONG_TENSOR_LENGTH,
                    f"tensor value has {got} bytes; input '{spec.name}' needs {expected} "
                    f"({spec.width} little-endian float32)",
                )
        good = np.flatnonzero(ok)
        finite = np.isfinite(rows).all(axis=1)
        for position in good[~finite]:
            errors.add(int(position), NON_FINITE, f"tensor for input '{spec.name}' holds NaN or Infinity")
        return _finish(errors, len(values), {spec.name: rows[finite]}, self.manifest.inputs, good[finite])

    def _decode_json(self, values: pa.Array) -> Decoded:
        errors = _Errors()
        lengths = pc.fill_null(pc.binary_length(values), 0).to_numpy(zero_copy_only=False)
        opens = pc.fill_null(pc.equal(pc.binary_slice(values, 0, 1), pa.scalar(b"{")), False)
        closes = pc.fill_null(pc.equal(pc.binary_slice(values, -1, _SLICE_END), pa.scalar(b"}")), False)
        clean = pc.and_(opens, closes).to_numpy(zero_copy_only=False)
        for position in np.flatnonzero(lengths == 0):
            errors.add(int(position), EMPTY_VALUE, "record value is null or empty")
        table, positions = self._parse_clean(values, np.flatnonzero(clean), errors)
        suspects = np.flatnonzero(~clean & (lengths > 0))
        if len(suspects):
            table, positions = self._add_suspects(values, suspects, table, positions, errors)
        keep = np.ones(len(positions), dtype=bool)
        columns: dict[str, np.ndarray] = {}
        for spec in self.manifest.inputs:
            if spec.features:
                columns[spec.name] = self._feature_matrix(spec, table, positions, keep, errors)
            else:
                columns[spec.name] = self._list_matrix(spec, table, positions, keep, errors)
        for spec in self.manifest.inputs:
            finite = np.isfinite(columns[spec.name]).all(axis=1)
            for position in positions[keep & ~finite]:
                errors.add(int(position), NON_FINITE, f"input '{spec.name}' holds NaN or Infinity")
            keep &= finite
        inputs = {name: matrix[keep] for name, matrix in columns.items()}
        return _finish(errors, len(values), inputs, self.manifest.inputs, positions[keep])

    def _parse_clean(self, values: pa.Array, clean: np.ndarray, errors: "_Errors") -> tuple[pa.Table, np.ndarray]:
        """Parse the values that start with '{' and end with '}' in one go, bisecting around failures.

        Records are joined with newlines. A raw newline cannot sit inside a JSON string, and after a
        record's final '}' the next record's '{' is a syntax error unless that '}' closed the record's
        object, so two records can never merge into one row: equal row and record counts mean every
        record gave exactly one row, in order.
        """
        subset = values if len(clean) == len(values) else values.take(pa.array(clean))
        lines = pc.binary_join_element_wise(subset, pa.scalar(b"\n"), pa.scalar(b""))
        offsets = np.frombuffer(lines.buffers()[1], dtype=np.int32)[lines.offset : lines.offset + len(lines) + 1]
        buffer = lines.buffers()[2]
        tables: list[pa.Table] = []
        parsed: list[np.ndarray] = []

        def visit(lo: int, hi: int) -> None:
            table, failure = self._read(buffer, int(offsets[lo]), int(offsets[hi]))
            if table is not None and table.num_rows == hi - lo:
                tables.append(table)
                parsed.append(clean[lo:hi])
                return
            if hi - lo == 1:
                errors.add(int(clean[lo]), *_classify(subset[lo].as_py(), table, failure))
                return
            mid = (lo + hi) // 2
            visit(lo, mid)
            visit(mid, hi)

        if len(clean):
            visit(0, len(clean))
        return self._join(tables, parsed)

    def _add_suspects(
        self, values: pa.Array, suspects: np.ndarray, table: pa.Table, positions: np.ndarray, errors: "_Errors"
    ) -> tuple[pa.Table, np.ndarray]:
        """Parse, one by one, values that do not look like a bare object (padding, arrays, garbage)."""
        tables, parsed = [table], [positions]
        for position in suspects:
            record = values[int(position)].as_py()
            piece, failure = self._read(pa.py_buffer(record), 0, len(record))
            if piece is not None and piece.num_rows == 1:
                tables.append(piece)
                parsed.append(np.array([position]))
            else:
                errors.add(int(position), *_classify(record, piece, failure))
        joined, order = self._join(tables, parsed)
        ranks = np.argsort(order, kind="stable")
        return joined.take(pa.array(ranks)), order[ranks]

    def _join(self, tables: list[pa.Table], parsed: list[np.ndarray]) -> tuple[pa.Table, np.ndarray]:
        if not tables:
            return self._parse_options.explicit_schema.empty_table(), np.zeros(0, dtype=np.int64)
        table = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
        return table.combine_chunks(), np.concatenate(parsed).astype(np.int64)

    def _read(self, buffer: pa.Buffer, start: int, stop: int) -> tuple[pa.Table | None, pa.ArrowInvalid | None]:
        size = stop - start
        options = pa_json.ReadOptions(use_threads=False, block_size=max(size + 1, _MIN_BLOCK))
        try:
            table = pa_json.read_json(
                pa.BufferReader(buffer.slice(start, size)),
                read_options=options,
                parse_options=self._parse_options,
            )
        except pa.ArrowInvalid as failure:
            return None, failure
        return table, None

    @staticmethod
    def _feature_matrix(
        spec: TensorSpec, table: pa.Table, positions: np.ndarray, keep: np.ndarray, errors: "_Errors"
    ) -> np.ndarray:
        matrix = np.empty((table.num_rows, len(spec.features)), dtype=np.float64)
        for j, name in enumerate(spec.features):
            column = table.column(name)
            missing = column.is_null().to_numpy(zero_copy_only=False)
            for position in positions[keep & missing]:
                errors.add(int(position), MISSING_FEATURE, f"feature '{name}' of input '{spec.name}' is missing or null")
            keep &= ~missing
            matrix[:, j] = pc.fill_null(column, 0.0).to_numpy()
        return matrix

    @staticmethod
    def _list_matrix(
        spec: TensorSpec, table: pa.Table, positions: np.ndarray, keep: np.ndarray, errors: "_Errors"
    ) -> np.ndarray:
        column = table.column(spec.name).combine_chunks()
        missing = column.is_null().to_numpy(zero_copy_only=False)
        for position in positions[keep & missing]:
            errors.add(int(position), MISSING_FEATURE, f"input '{spec.name}' is missing or null")
        keep &= ~missing
        lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy()
        wrong = keep & (lengths != spec.width)
        for position, length in zip(positions[wrong], lengths[wrong]):
            errors.add(
                int(position), WRONG_LENGTH, f"input '{spec.name}' has {int(length)} numbers; needs {spec.width}"
            )
        keep &= ~wrong
        holed = _list_has_null(column)
        for position in positions[keep & holed]:
            errors.add(int(position), WRONG_TYPE, f"input '{spec.name}' holds a null instead of a number")
        keep &= ~holed
        matrix = np.zeros((table.num_rows, spec.width), dtype=np.float64)
        if keep.any():
            selected = column.filter(pa.array(keep))
            matrix[keep] = pc.list_flatten(selected).to_numpy().reshape(-1, spec.width)
        return matrix


def check_payload_fits(manifest: Manifest, payload: str) -> None:
    """Raise :class:`ModelError` when records of kind ``payload`` cannot feed ``manifest``'s inputs."""
    label = f"{manifest.name}:{manifest.version}"
    if payload not in PAYLOADS:
        raise ModelError(label, f"payload '{payload}' is not one of {', '.join(PAYLOADS)}")
    if not manifest.inputs:
        raise ModelError(label, "manifest lists no inputs")
    if payload == PAYLOAD_TENSOR and len(manifest.inputs) != 1:
        raise ModelError(
            label, f"payload 'tensor' feeds exactly one input; the model has {len(manifest.inputs)}: use payload 'json'"
        )
    seen: set[str] = set()
    for spec in manifest.inputs:
        if any(dim <= 0 for dim in spec.shape[1:]):
            raise ModelError(label, f"input '{spec.name}' shape {list(spec.shape)} has a dynamic non-batch dimension")
        if spec.features and len(spec.features) != spec.width:
            raise ModelError(
                label, f"input '{spec.name}' names {len(spec.features)} features but its width is {spec.width}"
            )
        names = spec.features or (spec.name,)
        clash = seen.intersection(names)
        if clash:
            raise ModelError(label, f"JSON field(s) {sorted(clash)} feed more than one input; rename them")
        seen.update(names)
        try:
            np.dtype(spec.dtype)
        except TypeError as exc:
            raise ModelError(label, f"input '{spec.name}' has unknown dtype '{spec.dtype}'") from exc


def _float32_rows(values: pa.Array, width: int) -> np.ndarray:
    """A (n, width) float32 matrix over the data buffer of a binary array of width*4-byte values."""
    if len(values) == 0:
        return np.zeros((0, width), dtype=np.float32)
    offsets = np.frombuffer(values.buffers()[1], dtype=np.int32)[values.offset : values.offset + len(values) + 1]
    data = np.frombuffer(values.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    return data.view("<f4").reshape(len(values), width)


def _list_has_null(column: pa.ListArray) -> np.ndarray:
    """Per row of a list array: whether any element is null."""
    if column.values.null_count == 0:
        return np.zeros(len(column), dtype=bool)
    counts = pc.fill_null(pc.list_value_length(column), 0).to_numpy()
    element_null = column.values.is_null().to_numpy(zero_copy_only=False)
    starts = np.frombuffer(column.buffers()[1], dtype=np.int32)[column.offset : column.offset + len(column)]
    prefix = np.concatenate([[0], np.cumsum(element_null, dtype=np.int64)])
    return (prefix[starts + counts] - prefix[starts]) > 0


def _classify(record: bytes, table: pa.Table | None, failure: pa.ArrowInvalid | None) -> tuple[str, str]:
    """Error class and message of one record that did not parse to exactly one row."""
    if table is not None:
        if table.num_rows == 0:
            return EMPTY_VALUE, "record value holds no JSON object"
        return MULTIPLE_OBJECTS, f"record value holds {table.num_rows} JSON values; expected one object"
    try:
        document = json.loads(record)
    except UnicodeDecodeError as exc:
        return INVALID_JSON, f"record value is not UTF-8 ({exc.reason} at byte {exc.start})"
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":
            return MULTIPLE_OBJECTS, f"more than one JSON value in the record (extra data at char {exc.pos})"
        return INVALID_JSON, f"not valid JSON: {exc.msg} at char {exc.pos}"
    if not isinstance(document, dict):
        return NOT_AN_OBJECT, f"record value is a JSON {type(document).__name__}, not an object"
    text = str(failure).split("\n")[0]
    if "too big" in text:
        return NON_FINITE, f"a number is too large for a double: {text}"
    if "changed from" in text:
        return WRONG_TYPE, f"a feature has the wrong JSON type: {text}"
    return INVALID_JSON, f"not valid JSON for this model: {text}"


class _Errors:
    """Bad rows of one decode, in any order; sorted by position when finished."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, str, str]] = []

    def add(self, position: int, error_class: str, message: str) -> None:
        self.rows.append((position, error_class, message[:_MESSAGE_LIMIT]))


def _finish(
    errors: _Errors, total: int, inputs: dict[str, np.ndarray], specs: Sequence[TensorSpec], good: np.ndarray
) -> Decoded:
    rows = sorted(errors.rows)
    typed = {
        spec.name: np.ascontiguousarray(inputs[spec.name], dtype=np.dtype(spec.dtype)).reshape(
            (len(good), *spec.shape[1:])
        )
        for spec in specs
    }
    return Decoded(
        inputs=typed,
        good=np.asarray(good, dtype=np.int64),
        bad=np.array([r[0] for r in rows], dtype=np.int64),
        error_classes=tuple(r[1] for r in rows),
        error_messages=tuple(r[2] for r in rows),
    )


class Encoder:
    """Builds output records for scored rows and dead letters. Built once per session.

    ``scores`` given to :meth:`predictions` are the model's first output, one column per label.
    """

    def __init__(self, manifest: Manifest, output_topic: str, dead_letter_topic: str) -> None:
        self.labels = manifest.labels
        self.output_topic = output_topic
        self.dead_letter_topic = dead_letter_topic
        self._label_json = pa.array([json.dumps(label) for label in manifest.labels], pa.string())
        self._score_prefixes = [
            ("" if j == 0 else ",") + json.dumps(label) + ":" for j, label in enumerate(manifest.labels)
        ]
        model = json.dumps({"name": manifest.name, "version": manifest.version}, separators=(",", ":"))
        self._model_part = '}},"model":' + model + ',"source":{"topic":'

    def predictions(self, meta: pa.RecordBatch | pa.Table, scores: np.ndarray) -> pa.RecordBatch:
        """Output records for scored rows. ``meta`` has the Kafka source columns of those rows, in order."""
        n = meta.num_rows
        scores = scores.reshape(n, -1)
        if scores.shape[1] != len(self.labels):
            raise ModelError(
                "scores", f"model output has {scores.shape[1]} columns per row but the manifest has {len(self.labels)} labels"
            )
        keys = _column(meta, "key")
        topic = _json_string_body(_column(meta, "topic").cast(pa.string()))
        partition = pc.cast(_column(meta, "partition"), pa.string())
        offset = pc.cast(_column(meta, "offset"), pa.string())
        parts: list[pa.Array | str] = ['{"key":', _key_json(keys), ',"prediction":{"label":']
        parts.append(self._label_json.take(pa.array(np.argmax(scores, axis=1) if n else np.zeros(0, np.int64))))
        parts.append(',"scores":{')
        for j, prefix in enumerate(self._score_prefixes):
            parts += [prefix, _number_json(scores[:, j])]
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

    def dead_letters(self, batch: pa.RecordBatch, decoded: Decoded) -> pa.RecordBatch:
        """Dead-letter records for the bad rows of ``batch``: value unchanged, origin and error in headers.

        One Python step per bad row (bad rows are the exception, and each already cost a classification).
        """
        rows = pa.array(decoded.bad)
        meta = batch.take(rows)
        headers = _headers(meta, len(rows)).to_pylist()
        topics = _column(meta, "topic").to_pylist()
        partitions = _column(meta, "partition").to_pylist()
        offsets = _column(meta, "offset").to_pylist()
        stamps = _timestamp_ms(_column(meta, "timestamp")).to_pylist()
        for i, own in enumerate(headers):
            own.extend(
                {"key": key, "value": None if value is None else str(value).encode()}
                for key, value in (
                    (HEADER_ORIGIN_TOPIC, topics[i]),
                    (HEADER_ORIGIN_PARTITION, partitions[i]),
                    (HEADER_ORIGIN_OFFSET, offsets[i]),
                    (HEADER_ORIGIN_TIMESTAMP, stamps[i]),
                    (HEADER_ERROR_CLASS, decoded.error_classes[i]),
                    (HEADER_ERROR_MESSAGE, decoded.error_messages[i]),
                )
            )
        return pa.RecordBatch.from_arrays(
            [
                _column(meta, "key").cast(pa.binary()),
                _column(meta, "value").cast(pa.binary()),
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


def _json_string_body(text: pa.Array) -> pa.Array:
    """Escape a UTF-8 string array for use between JSON quotes (backslash, quote, control chars)."""
    escaped = pc.replace_substring(pc.replace_substring(text, "\\", "\\\\"), '"', '\\"')
    controls = pc.fill_null(pc.match_substring_regex(escaped, r"[\x00-\x1f]"), False)
    if not pc.any(controls).as_py():
        return escaped
    rows = escaped.to_pylist()
    for i in np.flatnonzero(controls.to_numpy(zero_copy_only=False)):
        rows[i] = json.dumps(text[int(i)].as_py())[1:-1]
    return pa.array(rows, pa.string())


def _key_json(keys: pa.Array) -> pa.Array:
    """The JSON text after ``"key":`` for each key: a string, null, or null plus ``"key_base64"``."""
    binary = keys.cast(pa.binary())
    try:
        text = binary.cast(pa.string())
    except pa.ArrowInvalid:
        return _key_json_mixed(binary)
    quoted = pc.binary_join_element_wise('"', _json_string_body(text), '"', "")
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


def _number_json(values: np.ndarray) -> pa.Array:
    array = pa.array(values)
    text = pc.cast(array, pa.string())
    return pc.if_else(pc.is_finite(array), text, "null")


def _timestamp_ms(stamps: pa.Array) -> pa.Array:
    if pa.types.is_timestamp(stamps.type):
        per_ms = {"s": None, "ms": 1, "us": 1000, "ns": 1_000_000}[stamps.type.unit]
        raw = stamps.cast(pa.timestamp(stamps.type.unit)).cast(pa.int64())
        return pc.multiply(raw, 1000) if per_ms is None else pc.divide(raw, per_ms)
    return stamps.cast(pa.int64())


def _timestamp_ms_json(stamps: pa.Array) -> pa.Array:
    return pc.fill_null(pc.cast(_timestamp_ms(stamps), pa.string()), "null")
