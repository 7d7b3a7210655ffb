"""The ``avro`` format: Avro binary records (fastavro). Runs in executor Python workers (decode) and in
clients (encode: the load generator, tests).

Two framings, chosen by the settings:

* ``payload.schema_registry_url``: the Confluent wire format, byte 0, a 4-byte big-endian schema id,
  then the record. Schemas are fetched by id and cached per worker (:mod:`streamhydro.payload.schemas`).
  Records are grouped by schema id with Arrow kernels and each group decoded with its schema. No
  magic byte or too short: ``NotWireFormat``; an id the registry does not know: ``UnknownSchema``;
  the registry unreachable: the task fails and Spark retries it.
* ``payload.schema``: an ``.avsc`` file; values are the bare record.

A body that does not decode with its schema, or leaves bytes over, is ``InvalidAvro``. Each record
is read from its own start in one buffer of the group's bodies (followed by padding), so a corrupt
record that reads past its end is caught by its end position and never shifts its neighbours.

Paths walk nested records (``user.age``); a union with ``null`` is allowed anywhere on the way, a
null is a missing field. Numbers: int, long, float, double; booleans: boolean; strings: string or
enum (the symbol); vector inputs: arrays. A schema that cannot feed the model is refused when it is
known in advance (fixed schema: :class:`ModelError` at start) and otherwise rejects the records
written with it (``MissingFeature`` / ``WrongType`` naming the schema id).
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import fastavro
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from streamhydro.config import PayloadSettings
from streamhydro.errors import ModelError
from streamhydro.payload import INVALID_AVRO, MISSING_FEATURE, NOT_WIRE_FORMAT, UNKNOWN_SCHEMA, WRONG_TYPE, Rejections
from streamhydro.payload import formats, schemas
from streamhydro.payload.fields import BOOLEAN, NUMBER, TEXT, InputField, input_fields, nested_schema
from streamhydro.registry import Manifest

_SLICE_END = 2**31 - 1
_PADDING = b"\x00" * 8
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_KINDS = {NUMBER: ("int", "long", "float", "double"), BOOLEAN: ("boolean",), TEXT: ("string", "enum")}
_PRIMITIVES = ("null", "boolean", "int", "long", "float", "double", "bytes", "string")


class Decoder(formats.Decoder):
    def __init__(self, manifest: Manifest, settings: PayloadSettings) -> None:
        super().__init__(manifest, settings)
        self.label = f"{manifest.name}:{manifest.version}"
        self._schemas: dict[int, tuple[Any, tuple[str, str] | None] | None] = {}
        self._fixed: Any = None
        self._struct = pa.struct(list(nested_schema(self.fields.fields)))
        if settings.schema:
            try:
                text = Path(settings.schema).read_text()
            except OSError as exc:
                raise ModelError(self.label, f"payload.schema {settings.schema} cannot be read ({exc}); copy it where tasks run") from exc
            parsed, problem = self._prepare(text, f"payload.schema {settings.schema}")
            if problem is not None:
                raise ModelError(self.label, f"{problem[1]}; map the input to a field of the schema, or fix the schema")
            self._fixed = parsed

    def _prepare(self, text: str, where: str) -> tuple[Any, tuple[str, str] | None]:
        """A schema text parsed for fastavro, and what keeps it from feeding the model (class, message)."""
        try:
            document = json.loads(text)
            parsed = fastavro.parse_schema(document)
        except (ValueError, TypeError, KeyError, fastavro.schema.SchemaParseException) as exc:
            raise ModelError(self.label, f"{where} is not a valid Avro schema ({exc})") from exc
        return parsed, check_fits(self.fields.fields, document, where)

    def _schema_for(self, schema_id: int) -> tuple[Any, tuple[str, str] | None] | None:
        if schema_id not in self._schemas:
            registered = schemas.schema(self.settings.schema_registry_url, self.settings.schema_registry_client, schema_id)
            if registered is None:
                self._schemas[schema_id] = None
            elif registered.schema_type.upper() != "AVRO":
                self._schemas[schema_id] = (None, (WRONG_TYPE, f"schema id {schema_id} is a {registered.schema_type} schema, not Avro"))
            else:
                try:
                    self._schemas[schema_id] = self._prepare(registered.text, f"schema id {schema_id}")
                except ModelError as exc:
                    self._schemas[schema_id] = (None, (WRONG_TYPE, exc.problem))
        return self._schemas[schema_id]

    def _decode(self, values: pa.Array) -> formats.Decoded:
        errors = Rejections()
        _, worth = self.screen(values, errors)
        positions = np.flatnonzero(worth)
        groups: list[tuple[Any, np.ndarray, int]] = []
        if self._fixed is not None:
            groups.append((self._fixed, positions, 0))
        else:
            framed, ids = schemas.split_header(values, positions, schemas.HEADER_BYTES)
            for position in positions[~framed]:
                errors.add(
                    position,
                    NOT_WIRE_FORMAT,
                    "value is not in the Confluent wire format (byte 0, a 4-byte schema id, the record), "
                    "which payload.schema_registry_url expects",
                )
            for schema_id in np.unique(ids[framed]).tolist():
                members = positions[framed & (ids == schema_id)]
                found = self._schema_for(schema_id)
                if found is None:
                    for position in members:
                        errors.add(position, UNKNOWN_SCHEMA, f"schema id {schema_id} is not in the schema registry")
                    continue
                parsed, problem = found
                if problem is not None:
                    for position in members:
                        errors.add(position, problem[0], problem[1])
                    continue
                groups.append((parsed, members, schemas.HEADER_BYTES))
        decoded: list[tuple[int, dict]] = []
        for parsed, members, start in groups:
            decoded.extend(_read_group(values, members, start, parsed, errors))
        decoded.sort(key=lambda item: item[0])
        good = np.array([position for position, _ in decoded], dtype=np.int64)
        records = [record for _, record in decoded]
        try:
            table = pa.array(records, self._struct)
            column = lambda field: pc.struct_field(table, list(field.parts))  # noqa: E731
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            # A value Arrow cannot take as the field's type (a union of number and string, say):
            # Python columns, which the field conversion classifies value by value.
            columns = {field.path: _column(records, field.parts) for field in self.fields.fields}
            column = lambda field: columns[field.path]  # noqa: E731
        inputs, kept = self.fields.convert(column, good, errors)
        return self.finish(errors, inputs, kept)


def _read_group(values: pa.Array, members: np.ndarray, start: int, parsed: Any, errors: Rejections) -> list[tuple[int, Any]]:
    """Decode the bodies of the values at ``members`` (after ``start`` header bytes) with one schema."""
    if len(members) == 0:
        return []
    bodies = pc.binary_slice(values.take(pa.array(members)), start, _SLICE_END)
    ends = formats.offsets(bodies)
    data = bodies.buffers()[2]
    size = int(ends[-1] - ends[0])
    buffer = io.BytesIO((data.slice(int(ends[0]), size).to_pybytes() if size else b"") + _PADDING)
    ends = ends - ends[0]
    out = []
    read = fastavro.schemaless_reader
    for i, position in enumerate(members.tolist()):
        buffer.seek(int(ends[i]))
        try:
            record = read(buffer, parsed)
        except Exception as exc:  # noqa: BLE001 -- whatever fastavro raises on these bytes is this record's problem
            errors.add(position, INVALID_AVRO, f"value does not decode with its Avro schema ({type(exc).__name__}: {exc})")
            continue
        end, stop = buffer.tell(), int(ends[i + 1])
        if end != stop:
            how = f"{stop - end} bytes left over after the record" if end < stop else "the record runs past the end of the value"
            errors.add(position, INVALID_AVRO, f"value does not decode with its Avro schema: {how}")
            continue
        out.append((position, record))
    return out


def _column(records: list[Any], parts: tuple[str, ...]) -> list[Any]:
    if len(parts) == 1:
        name = parts[0]
        return [r.get(name) if type(r) is dict else None for r in records]
    column = []
    for value in records:
        for part in parts:
            value = value.get(part) if type(value) is dict else None
        column.append(value)
    return column


def check_fits(fields: Iterable[InputField], schema: Any, where: str) -> tuple[str, str] | None:
    """What keeps an Avro schema (as JSON) from feeding the fields: (error class, message), or None."""
    names = _named_types(schema)
    for field in fields:
        node = schema
        for depth, part in enumerate(field.parts):
            records = [t for t in _branches(node, names) if isinstance(t, dict) and t.get("type") == "record"]
            if not records:
                at = ".".join(field.parts[:depth]) or "the top level"
                return WRONG_TYPE, f"{where}: {at} is not a record, so it has no field '{part}' ({field.describe()})"
            found = [f["type"] for r in records for f in r.get("fields", ()) if f.get("name") == part]
            if not found:
                have = sorted({f.get("name") for r in records for f in r.get("fields", ())})
                return MISSING_FEATURE, f"{where}: no field '{'.'.join(field.parts[:depth + 1])}' ({field.describe()}); the record has {have}"
            node = found[0]
        problem = _leaf_problem(node, field, names)
        if problem is not None:
            return WRONG_TYPE, f"{where}: field '{field.path}' is {problem} ({field.describe()} needs {_needs(field)})"
    return None


def _needs(field: InputField) -> str:
    kinds = " or ".join(_KINDS[field.kind])
    return f"an array of {kinds}" if field.vector else kinds


def _leaf_problem(node: Any, field: InputField, names: Mapping[str, Any]) -> str | None:
    branches = [t for t in _branches(node, names) if t != "null"]
    if not branches:
        return "always null"
    for branch in branches:
        if field.vector:
            if not (isinstance(branch, dict) and branch.get("type") == "array"):
                return f"of type {_type_name(branch)}"
            items = [t for t in _branches(branch.get("items"), names) if t != "null"]
            bad = [t for t in items if _type_name(t) not in _KINDS[field.kind]]
            if bad or not items:
                return f"an array of {_type_name(bad[0]) if bad else 'null'}"
        elif _type_name(branch) not in _KINDS[field.kind]:
            return f"of type {_type_name(branch)}"
    return None


def _type_name(node: Any) -> str:
    if isinstance(node, dict):
        if node.get("logicalType"):
            return f"{node.get('type')} ({node['logicalType']})"
        return str(node.get("type"))
    return str(node)


def _branches(node: Any, names: Mapping[str, Any]) -> list[Any]:
    """The types a schema node can hold, unions flattened, named references resolved."""
    if isinstance(node, list):
        return [b for item in node for b in _branches(item, names)]
    if isinstance(node, str) and node not in _PRIMITIVES:
        return [names.get(node, node)]
    if isinstance(node, dict) and isinstance(node.get("type"), (list, dict)):
        return _branches(node["type"], names)
    if isinstance(node, dict) and node.get("type") in _PRIMITIVES and not node.get("logicalType"):
        return [node["type"]]
    return [node]


def _named_types(schema: Any) -> dict[str, Any]:
    """Named types (records, enums, fixed) by name and full name."""
    names: dict[str, Any] = {}

    def visit(node: Any, namespace: str) -> None:
        if isinstance(node, list):
            for item in node:
                visit(item, namespace)
        elif isinstance(node, dict):
            kind = node.get("type")
            if kind in ("record", "error", "enum", "fixed") and isinstance(node.get("name"), str):
                name = node["name"]
                space = node.get("namespace", namespace) if "." not in name else name.rsplit(".", 1)[0]
                short = name.rsplit(".", 1)[-1]
                names[short] = node
                names[f"{space}.{short}" if space else short] = node
                namespace = space or ""
            for field in node.get("fields", ()) if kind in ("record", "error") else ():
                visit(field.get("type"), namespace)
            if kind == "array":
                visit(node.get("items"), namespace)
            if kind == "map":
                visit(node.get("values"), namespace)
            if isinstance(kind, (list, dict)):
                visit(kind, namespace)

    visit(schema, "")
    return names


_AVRO_TYPES = {"float16": "float", "float32": "float", "float64": "double", "int32": "int", "int64": "long", "bool": "boolean", "string": "string"}


def schema_for(manifest: Manifest, name: str = "Event", namespace: str = "streamhydro.events") -> dict[str, Any]:
    """An Avro schema (as JSON) with a field at every path the manifest's inputs read, nested records
    for the objects on the way; every field non-null."""
    label = f"{manifest.name}:{manifest.version}"
    tree: dict[str, Any] = {}
    for field in input_fields(manifest):
        for part in field.parts:
            if not _NAME.match(part):
                raise ModelError(label, f"field '{field.path}': '{part}' is not a valid Avro name ([A-Za-z_][A-Za-z0-9_]*); map the input to other fields")
        node = tree
        for part in field.parts[:-1]:
            node = node.setdefault(part, {})
        item = _AVRO_TYPES[field.spec.dtype]
        node[field.parts[-1]] = _Leaf({"type": "array", "items": item} if field.vector else item)

    def record(record_name: str, node: dict[str, Any]) -> dict[str, Any]:
        return {
            "type": "record",
            "name": record_name,
            "fields": [
                {"name": key, "type": value.avro if isinstance(value, _Leaf) else record(f"{record_name}_{key}", value)}
                for key, value in node.items()
            ],
        }

    return {**record(name, tree), "namespace": namespace}


class _Leaf:
    def __init__(self, avro: Any) -> None:
        self.avro = avro


def encode(events: Iterable[Mapping[str, Any]], schema: Mapping[str, Any], schema_id: int | None = None) -> list[bytes]:
    """Avro values of event records (nested dicts): bare, or in the wire format with ``schema_id``."""
    parsed = fastavro.parse_schema(dict(schema))
    header = b"" if schema_id is None else schemas.wire_header(schema_id)
    out = []
    for event in events:
        buffer = io.BytesIO()
        buffer.write(header)
        fastavro.schemaless_writer(buffer, parsed, event)
        out.append(buffer.getvalue())
    return out
