"""The ``json`` format: one JSON object per record. Runs in executor Python workers (decode) and in
clients (encode: the load generator, tests).

Each model field is read at its dotted path ("user.age" is ``{"user": {"age": ...}}``); numbers,
booleans, strings, and arrays for vector inputs (:mod:`streamhydro.payload.fields` says what each
input dtype takes). Other fields are ignored. A leading UTF-8 byte order mark and surrounding JSON
whitespace are allowed. A value over ``payload.max_value_bytes`` is rejected unparsed.

Decoding takes two passes:

* **Plain records** (almost all of a healthy stream) are read by msgspec into a typed ``Struct``
  mirroring the model's fields (nested structs for dotted paths, fixed-length lists for vector
  inputs, other fields skipped unparsed into Python), one C call per record, and the batch's inputs
  are built from those structs in numpy. A record is plain when msgspec reads it whole with every
  field present and of its exact JSON type, and its numbers fit the input's dtype.
* **The other records** (the batch's leftovers: anything msgspec refuses) take the general path.
  Those that start with ``{`` and end with ``}`` are joined into one newline-delimited buffer and
  parsed by ``pyarrow.json.read_json`` with an explicit schema (struct columns for nested objects,
  unexpected fields ignored at every level). When a block does not parse, or yields a different
  number of rows than it has records, it is split in halves until the failing records stand alone
  (O(bad * log n) parses). Each of those is read once by Python's ``json``: a record it can name a
  problem for is rejected with that problem's class (types, not pyarrow's message text); one whose
  model fields are all fine (pyarrow refused something about it that the model does not read: a
  field repeated, a number beyond a double in an ignored field) is rewritten to just its model
  fields and parsed again, so it decodes as msgspec would read it. Values that do not look like an
  object are classified in Python and never reach pyarrow: a top-level JSON ``null`` crashes
  ``pyarrow.json.read_json`` with a segmentation fault (pyarrow 26), which no ``except`` can catch.

Both passes read the same values: every JSON number as a double, the last of a field repeated in one
object, text that is valid UTF-8. A field name containing a dot cannot be addressed.
"""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Iterable, Mapping
from itertools import chain
from typing import Annotated, Any

import msgspec
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
from streamhydro.payload.fields import BOOLEAN, FLOATS, INTS, NUMBER, TEXT, column_at, nested_schema, numpy_dtype
from streamhydro.registry import Manifest, TensorSpec

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
        self._plain = _PlainReader(self.manifest, self._tree)
        self._text_fields = [field for field in self.fields.fields if field.kind == TEXT]

    def _decode(self, values: pa.Array) -> formats.Decoded:
        inputs, good, others = self._plain.read(values, self.settings.max_value_bytes)
        errors = Rejections()
        if not len(others):
            return self.finish(errors, inputs, good)
        rest = self._decode_general(values.take(pa.array(others)))
        errors.add_all(rest.rejected, others[rest.rejected.rows])
        positions = np.concatenate([good, others[rest.good]])
        order = np.argsort(positions, kind="stable")
        inputs = {name: np.concatenate([inputs[name], rest.inputs[name]])[order] for name in inputs}
        return self.finish(errors, inputs, positions[order])

    def _decode_general(self, values: pa.Array) -> formats.Decoded:
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
        table, positions = self._drop_text_not_utf8(table, positions, errors)
        inputs, good = self.fields.convert(lambda field: column_at(table, field), positions, errors)
        return self.finish(errors, inputs, good)

    def _drop_text_not_utf8(self, table: pa.Table, positions: np.ndarray, errors: Rejections) -> tuple[pa.Table, np.ndarray]:
        """Rejects the rows whose model text holds bytes that are not UTF-8 (pyarrow's reader copies them as they are)."""
        bad = np.zeros(table.num_rows, dtype=bool)
        for field in self._text_fields:
            column = column_at(table, field)
            try:
                column.validate(full=True)
                continue
            except pa.ArrowInvalid:
                pass
            texts = pc.list_flatten(column) if field.vector else column
            rows = pc.list_parent_indices(column).to_numpy() if field.vector else np.arange(len(column))
            invalid = np.array([text is not None and not _is_utf8(text) for text in texts.cast(pa.binary()).to_pylist()], dtype=bool)
            for row in np.unique(rows[invalid]):
                if not bad[row]:
                    errors.add(positions[row], INVALID_JSON, f"{field.describe()} is not UTF-8 text")
            bad[rows[invalid]] = True
        if not bad.any():
            return table, positions
        return table.filter(pa.array(~bad)), positions[~bad]

    def _parse_objects(
        self, records: pa.Array, positions: np.ndarray, errors: Rejections, rewrite: bool = True
    ) -> tuple[pa.Table, np.ndarray]:
        """Parse records that start with '{' and end with '}' in one go, bisecting around failures.

        ``records[i]`` is the record at ``positions[i]`` of the batch. Records are joined with
        newlines. A raw newline cannot sit inside a JSON string, and after a record's final '}' the
        next record's '{' is a syntax error unless that '}' closed the record's object, so two
        records can never merge into one row: equal row and record counts mean every record gave
        exactly one row, in order. A failing record whose model fields are fine is parsed again as
        its model fields alone (``rewrite``; once).
        """
        lines = pc.binary_join_element_wise(records, pa.scalar(b"\n"), pa.scalar(b""))
        offsets = formats.offsets(lines)
        buffer = lines.buffers()[2]
        tables: list[pa.Table] = []
        parsed: list[np.ndarray] = []
        rewritten = _Rewritten()

        def visit(lo: int, hi: int) -> None:
            table, failure = self._read(buffer, int(offsets[lo]), int(offsets[hi]))
            if table is not None and table.num_rows == hi - lo:
                tables.append(table)
                parsed.append(positions[lo:hi])
                return
            if hi - lo == 1:
                rows = None if table is None else table.num_rows
                outcome = self._classify(records[lo].as_py(), rows, failure, rewrite)
                rewritten.settle(positions[lo], outcome, errors)
                return
            mid = (lo + hi) // 2
            visit(lo, mid)
            visit(mid, hi)

        if len(records):
            visit(0, len(records))
        table, parsed_positions = self._join(tables, parsed)
        return self._add_bodies(rewritten, table, parsed_positions, errors, rewrite=False)

    def _add_suspects(
        self, values: pa.Array, suspects: np.ndarray, table: pa.Table, positions: np.ndarray, errors: Rejections
    ) -> tuple[pa.Table, np.ndarray]:
        """Values that do not look like a bare object (a BOM, padding, arrays, scalars, garbage).

        One that is an object once a leading BOM and JSON whitespace are trimmed is parsed like the
        others; the rest are classified in Python.
        """
        bodies = _Rewritten()
        for position in suspects:
            record = values[int(position)].as_py()
            body = record.removeprefix(_UTF8_BOM).strip(_JSON_WHITESPACE)
            if body.startswith(b"{") and body.endswith(b"}"):
                bodies.settle(position, body, errors)
            else:
                bodies.settle(position, self._classify(record, None, None, rewrite=False), errors)
        return self._add_bodies(bodies, table, positions, errors, rewrite=True)

    def _add_bodies(
        self, bodies: _Rewritten, table: pa.Table, positions: np.ndarray, errors: Rejections, rewrite: bool
    ) -> tuple[pa.Table, np.ndarray]:
        """``table`` (rows of the batch at ``positions``) with the rows of ``bodies`` parsed, in batch order."""
        if not bodies.positions:
            return table, positions
        more, more_positions = self._parse_objects(
            pa.array(bodies.bodies, pa.binary()), np.array(bodies.positions, np.int64), errors, rewrite
        )
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

    def _classify(
        self, record: bytes, rows: int | None, failure: pa.ArrowInvalid | None, rewrite: bool
    ) -> tuple[str, str] | bytes:
        """Error class and message of one record that did not give exactly one row, or (``rewrite``)
        the record as its model fields alone when nothing is wrong with them.

        ``rows`` is what pyarrow made of it when it parsed (None when it failed or never saw it),
        ``failure`` its error. The class comes from the JSON types Python's parser finds; pyarrow's
        message is only quoted. Bytes that are not UTF-8 count only inside a model field's text.
        """
        body = record.removeprefix(_UTF8_BOM).strip(_JSON_WHITESPACE)
        if not body:
            return EMPTY_VALUE, "record value holds only whitespace"
        if rows is not None and rows > 1:
            return MULTIPLE_OBJECTS, f"record value holds {rows} JSON values; expected one object"
        text = body.decode("utf-8", "surrogateescape")
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
        if rewrite:
            return json.dumps(_model_part(document, self._tree), separators=(",", ":")).encode()
        reason = str(failure).split("\n")[0] if failure is not None else "it gave no row"
        return INVALID_JSON, f"not valid JSON for this model: {reason}"


class _Rewritten:
    """Record bodies to parse again, by batch position; outcomes that are a class and message go to ``errors``."""

    def __init__(self) -> None:
        self.positions: list[int] = []
        self.bodies: list[bytes] = []

    def settle(self, position: int, outcome: tuple[str, str] | bytes, errors: Rejections) -> None:
        if isinstance(outcome, bytes):
            self.positions.append(int(position))
            self.bodies.append(outcome)
        else:
            errors.add(position, *outcome)


class _PlainReader:
    """msgspec's reading of a batch's plain records (see the module's docstring) into the model's inputs."""

    def __init__(self, manifest: Manifest, tree: Mapping[str, Any]) -> None:
        attributes: dict[str, str] = {}
        self._decode = msgspec.json.Decoder(_struct(tree, "", attributes)).decode
        top = [f"f{i}" for i in range(len(tree))]
        # Per input: its spec, the values of one event (astuple when it reads every top-level field in
        # order, the common flat event), and whether those are a sequence (several features, a vector).
        self._inputs: list[tuple[TensorSpec, Any, bool]] = []
        for spec in manifest.inputs:
            paths = [attributes[path] for path in spec.features or (spec.field or spec.name,)]
            getter = msgspec.structs.astuple if spec.features and paths == top else operator.attrgetter(*paths)
            self._inputs.append((spec, getter, len(paths) > 1 or not spec.features))

    def read(self, values: pa.Array, max_value_bytes: int) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        """The inputs of the plain records of ``values``, their positions, and the positions of the others.

        A value over ``max_value_bytes`` is not parsed (it is one of the others).
        """
        records = values.to_pylist()
        lengths = pc.fill_null(pc.binary_length(values), 0).to_numpy(zero_copy_only=False)
        for position in np.flatnonzero(lengths > max_value_bytes):
            records[position] = None
        events: list[Any] = []
        failed: list[int] = []
        remaining = iter(records)
        while True:
            try:
                events.extend(map(self._decode, remaining))  # keeps the events before a failure; ``remaining`` is past it
                break
            except (msgspec.DecodeError, TypeError, RecursionError):  # TypeError: a null value
                failed.append(len(events))
                events.append(None)
        plain = np.ones(len(records), dtype=bool)
        if failed:
            plain[failed] = False
            events = [event for event in events if event is not None]
        positions = np.flatnonzero(plain)
        inputs, fits = self._columns(events)
        if not fits.all():
            plain[positions[~fits]] = False
            positions = positions[fits]
            inputs = {name: matrix[fits] for name, matrix in inputs.items()}
        return inputs, positions, np.flatnonzero(~plain)

    def _columns(self, events: list[Any]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Each input's array of ``events``, and per event whether its numbers fit the inputs' dtypes."""
        n = len(events)
        fits = np.ones(n, dtype=bool)
        inputs: dict[str, np.ndarray] = {}
        for spec, getter, sequence in self._inputs:
            shape = (n, *spec.shape[1:])
            values = chain.from_iterable(map(getter, events)) if sequence else map(getter, events)
            if spec.dtype in FLOATS:
                with np.errstate(over="ignore"):
                    matrix = np.fromiter(values, dtype=spec.dtype, count=n * spec.width).reshape(shape)
                fits &= np.isfinite(matrix.reshape(n, spec.width)).all(axis=1)
            elif spec.dtype in INTS:
                raw = np.fromiter(values, dtype=np.float64, count=n * spec.width).reshape(n, spec.width)
                info = np.iinfo(spec.dtype)
                whole = (np.floor(raw) == raw) & (raw >= info.min) & (raw < float(info.max) + 1)  # 2**63 - 1 is no double
                fits &= whole.all(axis=1)
                matrix = np.where(whole, raw, 0).astype(spec.dtype).reshape(shape)
            else:
                matrix = np.fromiter(values, dtype=numpy_dtype(spec.dtype), count=n * spec.width).reshape(shape)
            inputs[spec.name] = matrix
        return inputs, fits


def _struct(tree: Mapping[str, Any], prefix: str, attributes: dict[str, str]) -> type:
    """The msgspec ``Struct`` of one object of the model's fields; fills ``attributes`` (field path ->
    dotted attribute path). Attributes are named f0, f1... and renamed to the JSON keys."""
    fields: list[tuple[str, Any]] = []
    rename: dict[str, str] = {}
    for i, (key, node) in enumerate(tree.items()):
        name = f"f{i}"
        rename[name] = key
        if isinstance(node, dict):
            kind = _struct(node, f"{prefix}{name}.", attributes)
        else:
            attributes[node.path] = f"{prefix}{name}"
            kind = _PLAIN_KIND[node.kind]
            if node.vector:
                width = node.spec.width
                kind = Annotated[list[kind], msgspec.Meta(min_length=width, max_length=width)]
        fields.append((name, kind))
    return msgspec.defstruct("Event", fields, rename=rename, gc=False)


_PLAIN_KIND = {NUMBER: float, BOOLEAN: bool, TEXT: str}  # msgspec's float takes JSON integers too


def _field_problem(document: _Object, tree: Mapping[str, Any], prefix: str) -> tuple[str, str] | None:
    """The first model field of a parsed object (at ``prefix``) that cannot feed the model, if any."""
    for name, value in _model_fields(document, tree).items():
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


def _model_fields(document: _Object, tree: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a parsed object that ``tree`` names, by name: the last of a field repeated in it counts."""
    return {name: value for name, value in document if name in tree}


def _model_part(document: _Object, tree: Mapping[str, Any]) -> dict[str, Any]:
    """The model fields of a parsed object, nested as in the object."""
    return {
        name: _model_part(value, tree[name]) if isinstance(value, _Object) and isinstance(tree[name], dict) else value
        for name, value in _model_fields(document, tree).items()
    }


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
    if kind == TEXT and not _is_utf8(value):
        return INVALID_JSON, f"{what} is not UTF-8 text (invalid bytes or a lone surrogate escape)"
    return None


def _is_utf8(text: str | bytes) -> bool:
    """Whether bytes decode as UTF-8, or a str encodes as UTF-8 (holds no lone surrogate)."""
    try:
        text.decode("utf-8") if isinstance(text, bytes) else text.encode("utf-8")
    except UnicodeError:
        return False
    return True


def encode(events: Iterable[Mapping[str, Any]]) -> list[bytes]:
    """JSON values of event records (nested dicts; numpy scalars and arrays allowed)."""
    return [json.dumps(event, separators=(",", ":"), default=_plain).encode() for event in events]


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


