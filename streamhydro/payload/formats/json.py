"""The ``json`` format: one JSON object per record. Runs in executor Python workers (decode) and in
clients (encode: the load generator, tests).

Each model field is read at its dotted path ("user.age" is ``{"user": {"age": ...}}``); numbers,
booleans, strings, and arrays for vector inputs (:mod:`streamhydro.payload.fields` says what each
input dtype takes). Other fields are ignored. A leading UTF-8 byte order mark and surrounding JSON
whitespace are allowed. A value over ``payload.max_value_bytes`` is rejected unparsed.

Decoding is vectorized: the values of a batch that start with ``{`` and end with ``}`` are joined
into one newline-delimited buffer and parsed by ``pyarrow.json.read_json`` with an explicit schema
(struct columns for nested objects, unexpected fields ignored at every level). When a block does
not parse, or yields a different number of rows than it has records, it is split in halves until
the bad records are isolated (O(bad * log n) parses, no per-record loop over good records). Each
isolated record is then classified once, by what Python's ``json`` finds in it (types, not
pyarrow's message text). Values that do not look like an object are classified in Python and never
reach pyarrow: a top-level JSON ``null`` crashes ``pyarrow.json.read_json`` with a segmentation
fault (pyarrow 26), which no ``except`` can catch.

Every JSON number is read as a double; a field name containing a dot cannot be addressed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json

from streamhydro.config import PayloadSettings
from streamhydro.payload import (
    EMPTY_VALUE,
    INVALID_JSON,
    MULTIPLE_OBJECTS,
    NON_FINITE,
    NOT_AN_OBJECT,
    WRONG_TYPE,
    Rejections,
)
from streamhydro.payload import formats
from streamhydro.payload.fields import BOOLEAN, NUMBER, TEXT, column_at, nested_schema
from streamhydro.registry import Manifest

_SLICE_END = 2**31 - 1
_MIN_BLOCK = 1 << 16
_UTF8_BOM = b"\xef\xbb\xbf"
_JSON_WHITESPACE = b" \t\r\n"


class Decoder(formats.Decoder):
    def __init__(self, manifest: Manifest, settings: PayloadSettings) -> None:
        super().__init__(manifest, settings)
        self._schema = nested_schema(self.fields.fields, integers=False)
        self._parse_options = pa_json.ParseOptions(explicit_schema=self._schema, unexpected_field_behavior="ignore")
        self._tree: dict[str, Any] = {}
        for field in self.fields.fields:
            node = self._tree
            for part in field.parts[:-1]:
                node = node.setdefault(part, {})
            node[field.parts[-1]] = field

    def _decode(self, values: pa.Array) -> formats.Decoded:
        errors = Rejections()
        lengths, worth = self.screen(values, errors)
        opens = pc.fill_null(pc.equal(pc.binary_slice(values, 0, 1), pa.scalar(b"{")), False)
        closes = pc.fill_null(pc.equal(pc.binary_slice(values, -1, _SLICE_END), pa.scalar(b"}")), False)
        clean = pc.and_(opens, closes).to_numpy(zero_copy_only=False) & worth
        positions = np.flatnonzero(clean)
        records = values if len(positions) == len(values) else values.take(pa.array(positions))
        table, positions = self._parse_objects(records, positions, errors)
        suspects = np.flatnonzero(~clean & worth)
        if len(suspects):
            table, positions = self._add_suspects(values, suspects, table, positions, errors)
        inputs, good = self.fields.convert(lambda field: column_at(table, field), positions, errors)
        return self.finish(errors, inputs, good)

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
        offsets = formats.offsets(lines)
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
            return self._schema.empty_table(), np.zeros(0, dtype=np.int64)
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
        problem = _field_problem(document, self._tree, "")
        if problem is not None:
            return problem
        reason = str(failure).split("\n")[0] if failure is not None else "it gave no row"
        return INVALID_JSON, f"not valid JSON for this model: {reason}"


def _field_problem(document: _Object, tree: Mapping[str, Any], prefix: str) -> tuple[str, str] | None:
    """The first model field of a parsed object (at ``prefix``) that cannot feed the model, if any."""
    found: dict[str, Any] = {}
    for name, value in document:
        if name in tree:
            if name in found:
                return INVALID_JSON, f"field '{prefix}{name}' appears more than once"
            found[name] = value
    for name, value in found.items():
        node = tree[name]
        if isinstance(node, dict):
            if value is None:
                continue
            if not isinstance(value, _Object):
                return WRONG_TYPE, f"field '{prefix}{name}' is a JSON {_json_type(value)}, not an object"
            problem = _field_problem(value, node, f"{prefix}{name}.")
        elif node.vector:
            if value is not None and type(value) is not list:
                problem = WRONG_TYPE, f"{node.describe()} is a JSON {_json_type(value)}, not an array"
            else:
                problems = (_value_problem(item, node.kind, f"an element of {node.describe()}") for item in value or ())
                problem = next((p for p in problems if p is not None), None)
        else:
            problem = _value_problem(value, node.kind, node.describe())
        if problem is not None:
            return problem
    return None


class _Object(list):
    """A parsed JSON object as its (name, value) pairs in order, duplicate names kept."""


# Every JSON number becomes a float, as in pyarrow's float64 columns: no int digit limit, 1e400 -> inf.
_PARSER = json.JSONDecoder(object_pairs_hook=_Object, parse_int=float)
_JSON_KIND = {NUMBER: float, BOOLEAN: bool, TEXT: str}


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


def _value_problem(value: Any, kind: str, what: str) -> tuple[str, str] | None:
    if value is None:
        return None
    if type(value) is not _JSON_KIND[kind]:
        return WRONG_TYPE, f"{what} is a JSON {_json_type(value)}, not a {kind}"
    if kind == NUMBER and not math.isfinite(value):
        return NON_FINITE, f"{what} is NaN, Infinity or too large for a double"
    return None


def encode(events: Iterable[Mapping[str, Any]]) -> list[bytes]:
    """JSON values of event records (nested dicts; numpy scalars and arrays allowed)."""
    return [json.dumps(event, separators=(",", ":"), default=_plain).encode() for event in events]


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


