"""Decoding: Kafka record values -> model input arrays, and a rejection for each bad record.

Runs in executor Python workers, once per Arrow batch of a scoring task; :func:`check_payload_fits`
also runs on the driver when a model version is validated.

Two payload kinds (``PAYLOADS``):

* ``json``: one JSON object per record. For every model input (:class:`TensorSpec`) with
  ``features``, each feature is a numeric field and the input's columns follow the feature order;
  an input without ``features`` is one field named like the input, holding a list of ``width``
  numbers. Other fields are ignored. A leading UTF-8 byte order mark and surrounding JSON
  whitespace are allowed. A value over ``max_value_bytes`` is rejected unparsed.
* ``tensor``: the record value is the raw little-endian float32 row of a single-input model,
  exactly ``width * 4`` bytes.

Decoding is vectorized: the values of a batch that start with ``{`` and end with ``}`` are joined
into one newline-delimited buffer and parsed by ``pyarrow.json.read_json`` with an explicit schema;
feature matrices are numpy views over the parsed columns. When a block does not parse, or yields
a different number of rows than it has records, it is split in halves until the bad records are
isolated (O(bad * log n) parses, no per-record loop over good records). Each isolated record is
then classified once, by what Python's ``json`` finds in it (types, not pyarrow's message text).
Values that do not look like an object are classified in Python and never reach pyarrow: a
top-level JSON ``null`` crashes ``pyarrow.json.read_json`` with a segmentation fault
(pyarrow 26), which no ``except`` can catch.

A number must be finite in the input's dtype: ``1e300`` is a double but not a float32.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json

from streamhydro.errors import ModelError
from streamhydro.payload import (
    EMPTY_VALUE,
    INVALID_JSON,
    MISSING_FEATURE,
    MULTIPLE_OBJECTS,
    NON_FINITE,
    NOT_AN_OBJECT,
    PAYLOAD_TENSOR,
    PAYLOADS,
    VALUE_TOO_LARGE,
    WRONG_LENGTH,
    WRONG_TENSOR_LENGTH,
    WRONG_TYPE,
    Rejected,
    Rejections,
    isolate,
)
from streamhydro.registry import Manifest, TensorSpec

MAX_VALUE_BYTES = 1 << 20  # the default of model.max_value_bytes

_SLICE_END = 2**31 - 1
_MIN_BLOCK = 1 << 16
_UTF8_BOM = b"\xef\xbb\xbf"
_JSON_WHITESPACE = b" \t\r\n"


@dataclasses.dataclass(frozen=True)
class Decoded:
    """The result of decoding one batch of record values.

    ``inputs`` maps each model input name to an array of the good rows, shaped like the input
    (batch axis first) and typed like it. ``good`` are the ascending row positions of those rows in
    the decoded batch; ``rejected`` names every other row and why.
    """

    inputs: dict[str, np.ndarray]
    good: np.ndarray
    rejected: Rejected


class Decoder:
    """Decodes record values for one model's inputs. Built once per session; cheap to call.

    Raises :class:`ModelError` at construction when the manifest cannot be fed from ``payload``.
    """

    def __init__(self, manifest: Manifest, payload: str, max_value_bytes: int = MAX_VALUE_BYTES) -> None:
        check_payload_fits(manifest, payload)
        self.manifest = manifest
        self.payload = payload
        self.max_value_bytes = max_value_bytes
        fields: list[pa.Field] = []
        self._fields: dict[str, TensorSpec] = {}
        for spec in manifest.inputs:
            if spec.features:
                fields.extend(pa.field(name, pa.float64()) for name in spec.features)
            else:
                fields.append(pa.field(spec.name, pa.list_(pa.float64())))
            self._fields.update((name, spec) for name in spec.features or (spec.name,))
        self._parse_options = pa_json.ParseOptions(
            explicit_schema=pa.schema(fields), unexpected_field_behavior="ignore"
        )

    def decode(self, values: pa.Array) -> Decoded:
        """Decode a binary array of record values (nulls allowed). No record's bytes make it raise."""
        rejections = Rejections()
        parts = isolate(lambda lo, hi: self._decode(values.slice(lo, hi - lo)), len(values), rejections)
        if len(parts) == 1 and not rejections:
            return parts[0][1]
        for lo, part in parts:
            rejections.add_all(part.rejected, lo)
        inputs = {
            spec.name: np.concatenate([_no_rows(spec)] + [part.inputs[spec.name] for _, part in parts])
            for spec in self.manifest.inputs
        }
        good = np.concatenate([np.zeros(0, np.int64)] + [part.good + lo for lo, part in parts])
        return Decoded(inputs, good, rejections.result())

    def _decode(self, values: pa.Array) -> Decoded:
        if self.payload == PAYLOAD_TENSOR:
            return self._decode_tensor(values)
        return self._decode_json(values)

    def _decode_tensor(self, values: pa.Array) -> Decoded:
        spec = self.manifest.inputs[0]
        expected = spec.width * 4
        lengths = pc.fill_null(pc.binary_length(values), -1).to_numpy(zero_copy_only=False)
        ok = lengths == expected
        good_values = values.filter(pa.array(ok))
        errors = Rejections()
        for position in np.flatnonzero(~ok):
            got = int(lengths[position])
            if got <= 0:
                errors.add(position, EMPTY_VALUE, "record value is null or empty")
            else:
                errors.add(
                    position,
                    WRONG_TENSOR_LENGTH,
                    f"tensor value has {got} bytes; input '{spec.name}' needs {expected} "
                    f"({spec.width} little-endian float32)",
                )
        good = np.flatnonzero(ok)
        rows, finite = _in_dtype(_float32_rows(good_values, spec.width), spec)
        for position in good[~finite]:
            errors.add(
                position, NON_FINITE, f"tensor for input '{spec.name}' holds NaN or Infinity, or overflows {spec.dtype}"
            )
        return _finish(errors, {spec.name: rows[finite]}, self.manifest.inputs, good[finite])

    def _decode_json(self, values: pa.Array) -> Decoded:
        errors = Rejections()
        lengths = pc.fill_null(pc.binary_length(values), 0).to_numpy(zero_copy_only=False)
        too_large = lengths > self.max_value_bytes
        for position in np.flatnonzero(too_large):
            errors.add(
                position,
                VALUE_TOO_LARGE,
                f"record value has {int(lengths[position])} bytes, over model.max_value_bytes = {self.max_value_bytes}: "
                "not parsed and not copied here; read it at its origin, or raise model.max_value_bytes",
            )
        for position in np.flatnonzero(lengths == 0):
            errors.add(position, EMPTY_VALUE, "record value is null or empty")
        opens = pc.fill_null(pc.equal(pc.binary_slice(values, 0, 1), pa.scalar(b"{")), False)
        closes = pc.fill_null(pc.equal(pc.binary_slice(values, -1, _SLICE_END), pa.scalar(b"}")), False)
        clean = pc.and_(opens, closes).to_numpy(zero_copy_only=False) & ~too_large
        positions = np.flatnonzero(clean)
        records = values if len(positions) == len(values) else values.take(pa.array(positions))
        table, positions = self._parse_objects(records, positions, errors)
        suspects = np.flatnonzero(~clean & ~too_large & (lengths > 0))
        if len(suspects):
            table, positions = self._add_suspects(values, suspects, table, positions, errors)
        keep = np.ones(len(positions), dtype=bool)
        columns: dict[str, np.ndarray] = {}
        for spec in self.manifest.inputs:
            if spec.features:
                matrix = self._feature_matrix(spec, table, positions, keep, errors)
            else:
                matrix = self._list_matrix(spec, table, positions, keep, errors)
            columns[spec.name], finite = _in_dtype(matrix, spec)
            for position in positions[keep & ~finite]:
                errors.add(position, NON_FINITE, f"input '{spec.name}' holds NaN or Infinity, or overflows {spec.dtype}")
            keep &= finite
        inputs = {name: matrix[keep] for name, matrix in columns.items()}
        return _finish(errors, inputs, self.manifest.inputs, positions[keep])

    def _parse_objects(
        self, records: pa.Array, positions: np.ndarray, errors: Rejections
    ) -> tuple[pa.Table, np.ndarray]:
        """Parse records that start with '{' and end with '}' in one go, bisecting around failures.

        ``records[i]`` is the record at ``positions[i]`` of the batch. Records are joined with
        newlines. A raw newline cannot sit inside a JSON string, and after a record's final '}' the
        next record's '{' is a syntax error unless that '}' closed the record's object, so two
        records can never merge into one row: equal row and record counts mean every record gave
        exactly one row, in order.
        """
        lines = pc.binary_join_element_wise(records, pa.scalar(b"\n"), pa.scalar(b""))
        offsets = _offsets(lines)
        buffer = lines.buffers()[2]
        tables: list[pa.Table] = []
        parsed: list[np.ndarray] = []

        def visit(lo: int, hi: int) -> None:
            table, failure = self._read(buffer, int(offsets[lo]), int(offsets[hi]))
            if table is not None and table.num_rows == hi - lo:
                tables.append(table)
                parsed.append(positions[lo:hi])
                return
            if hi - lo == 1:
                rows = None if table is None else table.num_rows
                errors.add(positions[lo], *self._classify(records[lo].as_py(), rows, failure))
                return
            mid = (lo + hi) // 2
            visit(lo, mid)
            visit(mid, hi)

        if len(records):
            visit(0, len(records))
        return self._join(tables, parsed)

    def _add_suspects(
        self, values: pa.Array, suspects: np.ndarray, table: pa.Table, positions: np.ndarray, errors: Rejections
    ) -> tuple[pa.Table, np.ndarray]:
        """Values that do not look like a bare object (a BOM, padding, arrays, scalars, garbage).

        One that is an object once a leading BOM and JSON whitespace are trimmed is parsed like the
        others; the rest are classified in Python.
        """
        bodies: list[bytes] = []
        kept: list[int] = []
        for position in suspects:
            record = values[int(position)].as_py()
            body = record.removeprefix(_UTF8_BOM).strip(_JSON_WHITESPACE)
            if body.startswith(b"{") and body.endswith(b"}"):
                bodies.append(body)
                kept.append(int(position))
            else:
                errors.add(position, *self._classify(record, None, None))
        if not bodies:
            return table, positions
        more, more_positions = self._parse_objects(pa.array(bodies, pa.binary()), np.array(kept, np.int64), errors)
        joined, order = self._join([table, more], [positions, more_positions])
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

    def _classify(self, record: bytes, rows: int | None, failure: pa.ArrowInvalid | None) -> tuple[str, str]:
        """Error class and message of one record that did not give exactly one row.

        ``rows`` is what pyarrow made of it when it parsed (None when it failed or never saw it),
        ``failure`` its error. The class comes from the JSON types Python's parser finds; pyarrow's
        message is only quoted.
        """
        body = record.removeprefix(_UTF8_BOM).strip(_JSON_WHITESPACE)
        if not body:
            return EMPTY_VALUE, "record value holds only whitespace"
        if rows is not None and rows > 1:
            return MULTIPLE_OBJECTS, f"record value holds {rows} JSON values; expected one object"
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            return INVALID_JSON, f"record value is not UTF-8 ({exc.reason} at byte {exc.start})"
        try:
            document, end = _PARSER.raw_decode(text)
            rest = text[end:].lstrip(" \t\r\n")
            if rest:
                at = len(text) - len(rest)
                try:
                    _PARSER.raw_decode(rest)
                except json.JSONDecodeError:
                    return INVALID_JSON, f"not valid JSON: unexpected text after the value at char {at}"
                return MULTIPLE_OBJECTS, f"more than one JSON value in the record (the second at char {at})"
        except json.JSONDecodeError as exc:
            return INVALID_JSON, f"not valid JSON: {exc.msg} at char {exc.pos}"
        except RecursionError:
            return INVALID_JSON, "JSON nested too deeply to parse"
        if not isinstance(document, _Object):
            return NOT_AN_OBJECT, f"record value is a JSON {_json_type(document)}, not an object"
        problem = self._field_problem(document)
        if problem is not None:
            return problem
        reason = str(failure).split("\n")[0] if failure is not None else "it gave no row"
        return INVALID_JSON, f"not valid JSON for this model: {reason}"

    def _field_problem(self, document: _Object) -> tuple[str, str] | None:
        """The first model field of a parsed object that cannot feed the model, if any."""
        fields: dict[str, Any] = {}
        for name, value in document:
            if name in self._fields:
                if name in fields:
                    return INVALID_JSON, f"field '{name}' appears more than once"
                fields[name] = value
        for name, value in fields.items():
            spec = self._fields[name]
            if spec.features:
                problem = _number_problem(value, f"feature '{name}' of input '{spec.name}'")
            elif value is not None and type(value) is not list:
                problem = WRONG_TYPE, f"input '{spec.name}' is a JSON {_json_type(value)}, not a list of numbers"
            else:
                problems = (_number_problem(item, f"an element of input '{spec.name}'") for item in value or ())
                problem = next((p for p in problems if p is not None), None)
            if problem is not None:
                return problem
        return None

    @staticmethod
    def _feature_matrix(
        spec: TensorSpec, table: pa.Table, positions: np.ndarray, keep: np.ndarray, errors: Rejections
    ) -> np.ndarray:
        matrix = np.empty((table.num_rows, len(spec.features)), dtype=np.float64)
        for j, name in enumerate(spec.features):
            column = table.column(name)
            missing = column.is_null().to_numpy(zero_copy_only=False)
            for position in positions[keep & missing]:
                errors.add(position, MISSING_FEATURE, f"feature '{name}' of input '{spec.name}' is missing or null")
            keep &= ~missing
            matrix[:, j] = pc.fill_null(column, 0.0).to_numpy()
        return matrix

    @staticmethod
    def _list_matrix(
        spec: TensorSpec, table: pa.Table, positions: np.ndarray, keep: np.ndarray, errors: Rejections
    ) -> np.ndarray:
        column = table.column(spec.name).combine_chunks()
        missing = column.is_null().to_numpy(zero_copy_only=False)
        for position in positions[keep & missing]:
            errors.add(position, MISSING_FEATURE, f"input '{spec.name}' is missing or null")
        keep &= ~missing
        lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy()
        wrong = keep & (lengths != spec.width)
        for position, length in zip(positions[wrong], lengths[wrong]):
            errors.add(position, WRONG_LENGTH, f"input '{spec.name}' has {int(length)} numbers; needs {spec.width}")
        keep &= ~wrong
        holed = _list_has_null(column)
        for position in positions[keep & holed]:
            errors.add(position, WRONG_TYPE, f"input '{spec.name}' holds a null instead of a number")
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


class _Object(list):
    """A parsed JSON object as its (name, value) pairs in order, duplicate names kept."""


# Every JSON number becomes a float, as in pyarrow's float64 columns: no int digit limit, 1e400 -> inf.
_PARSER = json.JSONDecoder(object_pairs_hook=_Object, parse_int=float)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "object" if isinstance(value, _Object) else "array"


def _number_problem(value: Any, what: str) -> tuple[str, str] | None:
    if value is None:
        return None
    if type(value) is not float:
        return WRONG_TYPE, f"{what} is a JSON {_json_type(value)}, not a number"
    if not math.isfinite(value):
        return NON_FINITE, f"{what} is NaN, Infinity or too large for a double"
    return None


def _offsets(array: pa.Array) -> np.ndarray:
    """The value offsets of a binary or large_binary array, as int64."""
    width = np.int64 if pa.types.is_large_binary(array.type) else np.int32
    raw = np.frombuffer(array.buffers()[1], dtype=width)
    return raw[array.offset : array.offset + len(array) + 1].astype(np.int64)


def _float32_rows(values: pa.Array, width: int) -> np.ndarray:
    """A (n, width) float32 matrix over the data buffer of a binary array of width*4-byte values."""
    if len(values) == 0:
        return np.zeros((0, width), dtype=np.float32)
    offsets = _offsets(values)
    data = np.frombuffer(values.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    return data.view("<f4").reshape(len(values), width)


def _in_dtype(matrix: np.ndarray, spec: TensorSpec) -> tuple[np.ndarray, np.ndarray]:
    """``matrix`` (rows x width) in the input's dtype, and per row whether every value is finite there."""
    dtype = np.dtype(spec.dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        typed = matrix.astype(dtype, copy=False)
    finite = np.isfinite(matrix).all(axis=1)
    if dtype.kind in "fc":
        finite &= np.isfinite(typed).all(axis=1)
    return typed, finite


def _list_has_null(column: pa.ListArray) -> np.ndarray:
    """Per row of a list array: whether any element is null."""
    if column.values.null_count == 0:
        return np.zeros(len(column), dtype=bool)
    counts = pc.fill_null(pc.list_value_length(column), 0).to_numpy()
    element_null = column.values.is_null().to_numpy(zero_copy_only=False)
    starts = np.frombuffer(column.buffers()[1], dtype=np.int32)[column.offset : column.offset + len(column)]
    prefix = np.concatenate([[0], np.cumsum(element_null, dtype=np.int64)])
    return (prefix[starts + counts] - prefix[starts]) > 0


def _no_rows(spec: TensorSpec) -> np.ndarray:
    return np.zeros((0, *spec.shape[1:]), dtype=np.dtype(spec.dtype))


def _finish(
    errors: Rejections, inputs: dict[str, np.ndarray], specs: Sequence[TensorSpec], good: np.ndarray
) -> Decoded:
    typed = {
        spec.name: np.ascontiguousarray(inputs[spec.name]).reshape((len(good), *spec.shape[1:])) for spec in specs
    }
    return Decoded(inputs=typed, good=np.asarray(good, dtype=np.int64), rejected=errors.result())
