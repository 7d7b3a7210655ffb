"""The ``protobuf`` format: Protocol Buffers messages. Runs in executor Python workers (decode) and in
clients (encode: the load generator, tests).

Two framings, chosen by the settings:

* ``payload.schema_registry_url``: the Confluent wire format, byte 0, a 4-byte big-endian schema id,
  the message indexes (zigzag varints: a count, then the path of indexes to the message in the
  schema; the single byte 0 means the first message), then the message. Schemas are fetched by id
  and cached per worker (:mod:`streamhydro.payload.schemas`): ``.proto`` source (with its
  references) is compiled by protoc (``grpcio-tools``), a base64 ``FileDescriptorProto`` (the
  registry's ``format=serialized``) is read as is. Errors as for Avro: ``NotWireFormat``,
  ``UnknownSchema``, and ``InvalidProtobuf`` for message indexes that name no message.
* ``payload.schema``: a ``.proto`` file, compiled the same way, and ``payload.message`` (empty: the
  file's first message); values are the bare message.

A body that does not parse is ``InvalidProtobuf``. The bodies of one message type are parsed in one
``ParseFromString`` of a wrapper message with a ``repeated`` field of that type: each body is one
length-delimited element, so a corrupt body fails the parse but can never shift its neighbours;
a group that fails is parsed message by message to find the bad ones.

Paths walk sub-messages (``user.age``). Numbers: any integer or floating type; booleans: bool;
strings: string, or an enum (its value's name). Vector inputs: ``repeated`` fields. Missing: an
unset sub-message on the path, an unset scalar with presence (``optional`` in proto3, any proto2
scalar), and an empty ``repeated`` field (the wire format cannot tell it from an absent one). A
proto3 scalar without ``optional`` has no presence: unset, it reads as its default (0, false, "").
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import operator
import re
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError

from streamhydro.config import PayloadSettings
from streamhydro.errors import ModelError, StreamhydroError
from streamhydro.payload import INVALID_PROTOBUF, MISSING_FEATURE, NOT_WIRE_FORMAT, UNKNOWN_SCHEMA, WRONG_TYPE, Rejections
from streamhydro.payload import formats, schemas
from streamhydro.payload.fields import BOOLEAN, NUMBER, TEXT, InputField, input_fields
from streamhydro.registry import Manifest

_SLICE_END = 2**31 - 1
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MAIN_FILE = "schema.proto"
_NUMBER_TYPES = {
    FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED32, FieldDescriptor.TYPE_SFIXED64,
}
_KIND_TYPES = {NUMBER: _NUMBER_TYPES, BOOLEAN: {FieldDescriptor.TYPE_BOOL}, TEXT: {FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_ENUM}}


class CompileError(StreamhydroError):
    """protoc refused a schema; ``args[0]`` is its message."""


class Decoder(formats.Decoder):
    def __init__(self, manifest: Manifest, settings: PayloadSettings) -> None:
        super().__init__(manifest, settings)
        self.label = f"{manifest.name}:{manifest.version}"
        self._files: dict[int, Any] = {}  # schema id -> compiled pool and main file, or a rejection
        self._readers: dict[tuple[int, tuple[int, ...]], _Reader | tuple[str, str]] = {}
        self._fixed: _Reader | None = None
        if settings.schema:
            try:
                text = Path(settings.schema).read_text()
            except OSError as exc:
                raise ModelError(self.label, f"payload.schema {settings.schema} cannot be read ({exc}); copy it where tasks run") from exc
            try:
                pool, main = compiled({_MAIN_FILE: text})
            except CompileError as exc:
                raise ModelError(self.label, f"payload.schema {settings.schema} does not compile: {exc.args[0]}") from exc
            descriptor = _find_message(pool, main, settings.message)
            if descriptor is None:
                raise ModelError(
                    self.label,
                    f"payload.message {settings.message!r} is not a message of {settings.schema}; "
                    f"it has {_message_names(main)}",
                )
            problem = check_fits(self.fields.fields, descriptor, f"message {descriptor.full_name}")
            if problem is not None:
                raise ModelError(self.label, f"{problem[1]}; map the input to a field of the message, or fix the schema")
            self._fixed = _Reader(descriptor, pool, self.fields.fields)

    def _reader(self, schema_id: int, indexes: tuple[int, ...]) -> _Reader | tuple[str, str] | None:
        key = (schema_id, indexes)
        if key in self._readers:
            return self._readers[key]
        if schema_id not in self._files:
            registered = schemas.schema(self.settings.schema_registry_url, self.settings.schema_registry_client, schema_id)
            if registered is None:
                self._files[schema_id] = None
            elif registered.schema_type.upper() != "PROTOBUF":
                self._files[schema_id] = (WRONG_TYPE, f"schema id {schema_id} is a {registered.schema_type} schema, not Protobuf")
            else:
                try:
                    self._files[schema_id] = compiled({**dict(registered.references), _MAIN_FILE: registered.text})
                except CompileError as exc:
                    self._files[schema_id] = (WRONG_TYPE, f"schema id {schema_id} does not compile: {exc.args[0]}")
        found = self._files[schema_id]
        if found is None:
            return None
        if isinstance(found[0], str):
            self._readers[key] = found
            return found
        pool, main = found
        descriptor = _message_at(main, indexes)
        if descriptor is None:
            reader: _Reader | tuple[str, str] = (INVALID_PROTOBUF, f"message indexes {list(indexes)} name no message of schema id {schema_id}")
        else:
            problem = check_fits(self.fields.fields, descriptor, f"schema id {schema_id}, message {descriptor.full_name}")
            reader = problem if problem is not None else _Reader(descriptor, pool, self.fields.fields)
        self._readers[key] = reader
        return reader

    def _decode(self, values: pa.Array) -> formats.Decoded:
        errors = Rejections()
        _, worth = self.screen(values, errors)
        positions = np.flatnonzero(worth)
        groups: list[tuple[_Reader, np.ndarray, np.ndarray]] = []
        if self._fixed is not None:
            groups.append((self._fixed, positions, np.zeros(len(positions), np.int64)))
        else:
            framed, ids = schemas.split_header(values, positions, schemas.HEADER_BYTES + 1)
            for position in positions[~framed]:
                errors.add(
                    position,
                    NOT_WIRE_FORMAT,
                    "value is not in the Confluent wire format (byte 0, a 4-byte schema id, message indexes, the message), "
                    "which payload.schema_registry_url expects",
                )
            positions, ids = positions[framed], ids[framed]
            starts, paths = _message_indexes(values, positions, errors)
            read = starts >= 0
            by_key: dict[tuple[int, tuple[int, ...]], list[int]] = {}
            for i in np.flatnonzero(read).tolist():
                by_key.setdefault((int(ids[i]), paths[i]), []).append(i)
            for (schema_id, indexes), members in by_key.items():
                reader = self._reader(schema_id, indexes)
                chosen = positions[members]
                if reader is None:
                    for position in chosen:
                        errors.add(position, UNKNOWN_SCHEMA, f"schema id {schema_id} is not in the schema registry")
                elif isinstance(reader, tuple):
                    for position in chosen:
                        errors.add(position, *reader)
                else:
                    groups.append((reader, chosen, starts[members]))
        parts = [reader.read(values, members, starts, errors) for reader, members, starts in groups if len(members)]
        if not parts:
            inputs, kept = self.fields.convert(lambda field: [], np.zeros(0, np.int64), errors)
            return self.finish(errors, inputs, kept)
        good = np.concatenate([p for p, _ in parts])
        order = np.argsort(good, kind="stable")
        columns = {field.path: _ordered([c[field.path] for _, c in parts], order) for field in self.fields.fields}
        inputs, kept = self.fields.convert(lambda field: columns[field.path], good[order], errors)
        return self.finish(errors, inputs, kept)


def _ordered(pieces: list[list[Any]], order: np.ndarray) -> list[Any]:
    joined = pieces[0] if len(pieces) == 1 else [v for piece in pieces for v in piece]
    if len(pieces) == 1 and (len(order) == 0 or (order == np.arange(len(order))).all()):
        return joined
    return [joined[i] for i in order.tolist()]


class _Reader:
    """Parses the bodies of one message type and reads the model's fields out of them."""

    def __init__(self, descriptor: Descriptor, pool: descriptor_pool.DescriptorPool, fields: Sequence[InputField]) -> None:
        self.message = message_factory.GetMessageClass(descriptor)
        self.batch = message_factory.GetMessageClass(_wrapper(pool, descriptor))
        self.steps = {field.path: _steps(descriptor, field) for field in fields}

    def read(self, values: pa.Array, members: np.ndarray, starts: np.ndarray, errors: Rejections) -> tuple[np.ndarray, dict[str, list[Any]]]:
        chosen = values.take(pa.array(members))
        bodies = [value[int(start):] for value, start in zip(chosen.to_pylist(), starts.tolist())]
        messages: list[Any] | None = None
        batch = self.batch()
        try:
            batch.ParseFromString(b"".join(b"\x0a" + _varint(len(body)) + body for body in bodies))
            messages = list(batch.items)
        except DecodeError:
            messages = None
        good = members
        if messages is None or len(messages) != len(bodies):
            kept, messages = [], []
            for position, body in zip(members.tolist(), bodies):
                message = self.message()
                try:
                    message.ParseFromString(body)
                except Exception as exc:  # noqa: BLE001 -- whatever the parser raises on these bytes is this record's problem
                    errors.add(position, INVALID_PROTOBUF, f"value does not parse as {self.message.DESCRIPTOR.full_name} ({type(exc).__name__}: {exc})")
                    continue
                kept.append(position)
                messages.append(message)
            good = np.array(kept, dtype=np.int64)
        return good, _columns(messages, self.steps)


@dataclasses.dataclass(frozen=True)
class _Leaf:
    """How to read one checked path: the sub-messages on the way, then the field itself."""

    parents: tuple[str, ...]
    name: str
    presence: bool  # an unset value is missing (optional scalars; proto2)
    repeated: bool
    enum_names: Mapping[int, str] | None  # enum values read as their names (string inputs)


def _steps(descriptor: Descriptor, field: InputField) -> _Leaf:
    for part in field.parts[:-1]:
        descriptor = descriptor.fields_by_name[part].message_type
    found = descriptor.fields_by_name[field.parts[-1]]
    names = {v.number: v.name for v in found.enum_type.values} if found.enum_type is not None and field.kind == TEXT else None
    return _Leaf(field.parts[:-1], found.name, found.has_presence and not found.is_repeated, found.is_repeated, names)


def _columns(messages: list[Any], leaves: Mapping[str, _Leaf]) -> dict[str, list[Any]]:
    """Each path's values (None where missing), one list comprehension per field."""
    holders: dict[tuple[str, ...], list[Any]] = {(): messages}

    def parents(path: tuple[str, ...]) -> list[Any]:
        if path not in holders:
            above, name = parents(path[:-1]), path[-1]
            holders[path] = [None if m is None else (getattr(m, name) if m.HasField(name) else None) for m in above]
        return holders[path]

    out = {}
    for path, leaf in leaves.items():
        owners, get, name = parents(leaf.parents), operator.attrgetter(leaf.name), leaf.name
        if leaf.repeated:
            values = [None if m is None else (list(get(m)) or None) for m in owners]
        elif leaf.presence:
            values = [get(m) if m is not None and m.HasField(name) else None for m in owners]
        else:
            values = [None if m is None else get(m) for m in owners]
        names = leaf.enum_names
        if names is not None:
            values = [
                None if v is None else ([names.get(x, str(x)) for x in v] if leaf.repeated else names.get(v, str(v))) for v in values
            ]
        out[path] = values
    return out


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _zigzag_varints(data: bytes, at: int, count: int) -> tuple[list[int], int] | None:
    """``count`` zigzag varints of ``data`` from ``at``, and where they end; None when they run out."""
    out = []
    for _ in range(count):
        shift = value = 0
        while True:
            if at >= len(data) or shift > 63:
                return None
            byte = data[at]
            at += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        out.append((value >> 1) ^ -(value & 1))
    return out, at


def _message_indexes(values: pa.Array, positions: np.ndarray, errors: Rejections) -> tuple[np.ndarray, list[tuple[int, ...]]]:
    """Per value at ``positions``: where its message starts (-1: rejected here) and its index path."""
    starts = np.full(len(positions), schemas.HEADER_BYTES + 1, dtype=np.int64)
    paths: list[tuple[int, ...]] = [(0,)] * len(positions)
    if len(positions) == 0:
        return starts, paths
    chosen = values.take(pa.array(positions))
    first = pc.binary_slice(chosen, schemas.HEADER_BYTES, schemas.HEADER_BYTES + 1)
    plain = pc.equal(first, pa.scalar(b"\x00")).to_numpy(zero_copy_only=False)
    for i in np.flatnonzero(~plain).tolist():
        data = chosen[i].as_py()
        count = _zigzag_varints(data, schemas.HEADER_BYTES, 1)
        found = None
        if count is not None and 0 < count[0][0] <= 64:
            found = _zigzag_varints(data, count[1], count[0][0])
        if found is None or min(found[0]) < 0:
            errors.add(positions[i], INVALID_PROTOBUF, "the message indexes after the schema id are malformed")
            starts[i] = -1
            continue
        paths[i] = tuple(found[0])
        starts[i] = found[1]
    return starts, paths


def check_fits(fields: Iterable[InputField], descriptor: Descriptor, where: str) -> tuple[str, str] | None:
    """What keeps a message type from feeding the fields: (error class, message), or None."""
    for field in fields:
        node = descriptor
        for depth, part in enumerate(field.parts):
            found = node.fields_by_name.get(part)
            if found is None:
                return MISSING_FEATURE, f"{where}: no field '{'.'.join(field.parts[:depth + 1])}' ({field.describe()}); {node.full_name} has {sorted(node.fields_by_name)}"
            last = depth == len(field.parts) - 1
            repeated = found.is_repeated
            if not last:
                if found.message_type is None or repeated:
                    return WRONG_TYPE, f"{where}: '{'.'.join(field.parts[:depth + 1])}' is not a (single) message, so it has no field '{field.parts[depth + 1]}'"
                node = found.message_type
                continue
            if repeated != field.vector or found.type not in _KIND_TYPES[field.kind] or (found.message_type and found.message_type.GetOptions().map_entry):
                shape = "a repeated field of " if field.vector else "a single "
                return WRONG_TYPE, f"{where}: field '{field.path}' does not fit {field.describe()}, which needs {shape}{field.kind}s" if field.vector else f"{where}: field '{field.path}' does not fit {field.describe()}, which needs {shape}{field.kind}"
    return None


def compiled(files: Mapping[str, str]) -> tuple[descriptor_pool.DescriptorPool, Any]:
    """A descriptor pool holding the compiled ``files`` (name -> .proto source, or a base64
    FileDescriptorProto) and the main file's descriptor (``schema.proto``). Cached per process."""
    key = hashlib.sha256(repr(sorted(files.items())).encode()).hexdigest()
    with _compile_lock:
        if key not in _compiled:
            _compiled[key] = _compile(files)
        return _compiled[key]


_compile_lock = threading.Lock()
_compiled: dict[str, tuple[descriptor_pool.DescriptorPool, Any]] = {}


def _compile(files: Mapping[str, str]) -> tuple[descriptor_pool.DescriptorPool, Any]:
    serialized = {name: _serialized(text) for name, text in files.items()}
    protos: list[descriptor_pb2.FileDescriptorProto] = []
    if all(v is not None for v in serialized.values()):
        for name, proto in serialized.items():
            if name == _MAIN_FILE:
                proto.name = _MAIN_FILE
            protos.append(proto)
    else:
        protos = _protoc({name: text for name, text in files.items()})
    pool = descriptor_pool.DescriptorPool()
    try:
        for proto in _dependency_order(protos):
            pool.Add(proto)
        return pool, pool.FindFileByName(_MAIN_FILE)
    except (TypeError, KeyError, ValueError) as exc:
        raise CompileError(str(exc)) from exc


def _serialized(text: str) -> descriptor_pb2.FileDescriptorProto | None:
    """A base64 FileDescriptorProto (a registry's ``format=serialized``), or None for .proto source."""
    if "{" in text or ";" in text:
        return None
    try:
        proto = descriptor_pb2.FileDescriptorProto()
        proto.ParseFromString(base64.b64decode(text, validate=True))
        return proto
    except (binascii.Error, DecodeError, ValueError):
        return None


def _protoc(files: Mapping[str, str]) -> list[descriptor_pb2.FileDescriptorProto]:
    """Compile .proto sources with protoc (grpcio-tools), well-known types included."""
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory(prefix="streamhydro-proto-") as work:
        for name, text in files.items():
            path = Path(work, "src", name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        out = Path(work, "set.pb")
        result = subprocess.run(
            [sys.executable, "-m", "grpc_tools.protoc", f"-I{work}/src", f"-I{include}", "--include_imports",
             f"--descriptor_set_out={out}", _MAIN_FILE],
            capture_output=True, text=True, timeout=60, check=False,
        )
        if result.returncode != 0:
            raise CompileError((result.stderr or result.stdout).strip()[:1000])
        descriptor_set = descriptor_pb2.FileDescriptorSet()
        descriptor_set.ParseFromString(out.read_bytes())
    return list(descriptor_set.file)


def _dependency_order(protos: list[descriptor_pb2.FileDescriptorProto]) -> list[descriptor_pb2.FileDescriptorProto]:
    by_name = {p.name: p for p in protos}
    done: list[descriptor_pb2.FileDescriptorProto] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen or name not in by_name:
            return
        seen.add(name)
        for dependency in by_name[name].dependency:
            visit(dependency)
        done.append(by_name[name])

    for proto in protos:
        visit(proto.name)
    return done


def _find_message(pool: descriptor_pool.DescriptorPool, main: Any, name: str) -> Descriptor | None:
    if not name:
        return next(iter(main.message_types_by_name.values()), None)
    try:
        return pool.FindMessageTypeByName(name.lstrip("."))
    except KeyError:
        return None


def _message_names(main: Any) -> list[str]:
    return [m.full_name for m in main.message_types_by_name.values()]


def _message_at(main: Any, indexes: tuple[int, ...]) -> Descriptor | None:
    """The message the wire format's index path names: top-level index, then nested ones."""
    candidates = list(main.message_types_by_name.values())
    descriptor = None
    for index in indexes:
        if not 0 <= index < len(candidates):
            return None
        descriptor = candidates[index]
        candidates = list(descriptor.nested_types)
    return descriptor


_wrapper_lock = threading.Lock()


def _wrapper(pool: descriptor_pool.DescriptorPool, descriptor: Descriptor) -> Descriptor:
    """A message type ``Batch { repeated <descriptor> items = 1; }`` in ``pool``, added once."""
    name = "streamhydro_batch_" + hashlib.sha256(descriptor.full_name.encode()).hexdigest()[:16]
    with _wrapper_lock:
        try:
            return pool.FindMessageTypeByName(f"{name}.Batch")
        except KeyError:
            pass
        proto = descriptor_pb2.FileDescriptorProto(name=f"{name}.proto", package=name, syntax="proto3")
        proto.dependency.append(descriptor.file.name)
        message = proto.message_type.add(name="Batch")
        message.field.add(
            name="items", number=1, label=FieldDescriptor.LABEL_REPEATED, type=FieldDescriptor.TYPE_MESSAGE,
            type_name="." + descriptor.full_name,
        )
        pool.Add(proto)
        return pool.FindMessageTypeByName(f"{name}.Batch")


_PROTO_TYPES = {"float16": "float", "float32": "float", "float64": "double", "int32": "int32", "int64": "int64", "bool": "bool", "string": "string"}


def proto_for(manifest: Manifest, message: str = "Event", package: str = "streamhydro.events") -> str:
    """A proto3 schema whose first message has a field at every path the manifest's inputs read:
    sub-messages for the objects on the way, ``optional`` scalars (so a missing one is seen) and
    ``repeated`` fields for vector inputs."""
    label = f"{manifest.name}:{manifest.version}"
    tree: dict[str, Any] = {}
    for field in input_fields(manifest):
        for part in field.parts:
            if not _NAME.match(part):
                raise ModelError(label, f"field '{field.path}': '{part}' is not a valid Protobuf field name; map the input to other fields")
        node = tree
        for part in field.parts[:-1]:
            node = node.setdefault(part, {})
        kind = _PROTO_TYPES[field.spec.dtype]
        node[field.parts[-1]] = f"repeated {kind}" if field.vector else f"optional {kind}"

    def render(name: str, node: dict[str, Any], indent: str) -> list[str]:
        lines = [f"{indent}message {name} {{"]
        for number, (key, value) in enumerate(node.items(), start=1):
            if isinstance(value, dict):
                nested = "M_" + key
                lines.extend(render(nested, value, indent + "  "))
                lines.append(f"{indent}  {nested} {key} = {number};")
            else:
                lines.append(f"{indent}  {value} {key} = {number};")
        lines.append(f"{indent}}}")
        return lines

    return "\n".join(['syntax = "proto3";', f"package {package};", "", *render(message, tree, ""), ""])


def message_class(proto: str, message: str = "") -> Any:
    """The message class of ``message`` (empty: the first) in .proto source, compiled with protoc."""
    pool, main = compiled({_MAIN_FILE: proto})
    descriptor = _find_message(pool, main, message)
    if descriptor is None:
        raise ModelError("protobuf", f"message {message!r} is not in the schema; it has {_message_names(main)}")
    return message_factory.GetMessageClass(descriptor)


def encode(events: Iterable[Mapping[str, Any]], message: Any, schema_id: int | None = None, indexes: Sequence[int] = (0,)) -> list[bytes]:
    """Protobuf values of event records (nested dicts) as ``message`` (a class): bare, or in the
    wire format with ``schema_id`` and the message ``indexes``."""
    header = b""
    if schema_id is not None:
        path = b"\x00" if list(indexes) == [0] else b"".join(_varint((i << 1) ^ (i >> 63)) for i in [len(indexes), *indexes])
        header = schemas.wire_header(schema_id) + path
    return [header + message(**event).SerializeToString() for event in events]
