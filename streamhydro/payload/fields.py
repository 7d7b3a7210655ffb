"""Event fields -> typed model inputs, and a rejection for each record whose fields cannot feed them.

Runs in executor Python workers (every payload format decodes through it) and on the driver (the
mapping checks of :func:`input_fields`). Pure pyarrow/numpy.

A model input (:class:`TensorSpec`) is fed by dotted paths into the event ("user.age" is
``event["user"]["age"]``): with ``features``, one scalar field per column; otherwise one ``field``
(default: the input's name) holding an array of ``width`` values. What a field must hold depends on
the input's dtype:

* float16/32/64: a number, finite in that dtype (``1e300`` is a double but not a float32);
* int32/64: a whole number within the dtype's range (JSON numbers are read as doubles, so an
  int64 is exact up to 2**53 there; Avro and Protobuf integers are exact);
* bool: a boolean; string: a string (categorical values, passed to the model as they are).

Formats hand :meth:`Fields.convert` one column per path: an Arrow array (JSON parses straight into
typed columns) or a Python list of the decoded values (Avro, Protobuf), ``None`` where the field is
absent. Classes: ``MissingFeature`` (absent or null), ``WrongType`` (wrong kind of value, a null
inside an array, a fraction for an integer input), ``WrongLength`` (an array of the wrong size),
``NonFinite`` (NaN, infinity, out of the dtype's range).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from streamhydro.errors import ModelError
from streamhydro.payload import MISSING_FEATURE, NON_FINITE, WRONG_LENGTH, WRONG_TYPE, Rejections
from streamhydro.registry import Manifest, TensorSpec

FLOATS = ("float16", "float32", "float64")
INTS = ("int32", "int64")
BOOL = "bool"
STRING = "string"
INPUT_DTYPES = (*FLOATS, *INTS, BOOL, STRING)

NUMBER, BOOLEAN, TEXT = "number", "boolean", "string"  # what a field holds, by the input's dtype


def numpy_dtype(dtype: str) -> np.dtype:
    """The numpy dtype an input of ``dtype`` is fed as (strings as Python objects, as ONNX Runtime takes them)."""
    return np.dtype(object) if dtype == STRING else np.dtype(dtype)


def value_kind(dtype: str) -> str:
    """What one value of an input of ``dtype`` is in an event: a number, a boolean or a string."""
    if dtype == BOOL:
        return BOOLEAN
    if dtype == STRING:
        return TEXT
    return NUMBER


@dataclasses.dataclass(frozen=True)
class InputField:
    """One event field feeding a model input: a scalar column, or (``vector``) an array of ``width`` values."""

    path: str
    spec: TensorSpec
    vector: bool

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(self.path.split("."))

    @property
    def kind(self) -> str:
        return value_kind(self.spec.dtype)

    def describe(self) -> str:
        if self.vector:
            return f"input '{self.spec.name}' (field '{self.path}')"
        return f"feature '{self.path}' of input '{self.spec.name}'"


def input_fields(manifest: Manifest) -> tuple[InputField, ...]:
    """Every field the manifest's inputs read, in input and column order; raises :class:`ModelError`
    when the mapping is not one every format can read."""
    label = f"{manifest.name}:{manifest.version}"
    if not manifest.inputs:
        raise ModelError(label, "manifest lists no inputs")
    fields: list[InputField] = []
    for spec in manifest.inputs:
        if any(dim <= 0 for dim in spec.shape[1:]):
            raise ModelError(label, f"input '{spec.name}' shape {list(spec.shape)} has a dynamic non-batch dimension")
        if spec.dtype not in INPUT_DTYPES:
            raise ModelError(label, f"input '{spec.name}' has dtype '{spec.dtype}'; inputs can be {', '.join(INPUT_DTYPES)}")
        if spec.features and spec.field:
            raise ModelError(label, f"input '{spec.name}' names both features and a field; keep one")
        if spec.features:
            if len(spec.features) != spec.width:
                raise ModelError(label, f"input '{spec.name}' names {len(spec.features)} features but its width is {spec.width}")
            fields.extend(InputField(path, spec, vector=False) for path in spec.features)
        else:
            fields.append(InputField(spec.field or spec.name, spec, vector=True))
    seen: dict[str, InputField] = {}
    for field in fields:
        if not all(field.parts):
            raise ModelError(label, f"{field.describe()}: path '{field.path}' has an empty part; write it like 'user.age'")
        if field.path in seen:
            raise ModelError(label, f"field '{field.path}' feeds more than one input column; map each column to its own field")
        seen[field.path] = field
    for path in seen:
        for other in seen:
            if other.startswith(path + "."):
                raise ModelError(label, f"field '{path}' feeds an input and also holds '{other}'; a field is a value or an object, not both")
    return tuple(fields)


Column = pa.Array | pa.ChunkedArray | list


class Fields:
    """Turns a batch's event fields into the model's inputs. Built once per decoder; cheap to call."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.fields = input_fields(manifest)

    def convert(
        self, column: Callable[[InputField], Column], positions: np.ndarray, errors: Rejections
    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The inputs of the rows at ``positions`` (batch positions of the ``len(positions)`` rows that
        ``column(field)`` holds), and the positions of the rows that fed every input; each other row
        gets one rejection in ``errors``."""
        n = len(positions)
        keep = np.ones(n, dtype=bool)
        matrices: dict[str, np.ndarray] = {}
        for spec in self.manifest.inputs:
            matrices[spec.name] = np.zeros((n, spec.width), dtype=numpy_dtype(spec.dtype))
        columns: dict[str, int] = {}
        for field in self.fields:
            matrix = matrices[field.spec.name]
            values = column(field)
            if field.vector:
                _vector_into(field, values, matrix, positions, keep, errors)
            else:
                j = columns.get(field.spec.name, 0)
                columns[field.spec.name] = j + 1
                _scalar_into(field, values, matrix, j, positions, keep, errors)
        inputs = {
            spec.name: np.ascontiguousarray(matrices[spec.name][keep]).reshape((int(keep.sum()), *spec.shape[1:]))
            for spec in self.manifest.inputs
        }
        return inputs, positions[keep]

    def no_rows(self) -> dict[str, np.ndarray]:
        return {spec.name: np.zeros((0, *spec.shape[1:]), dtype=numpy_dtype(spec.dtype)) for spec in self.manifest.inputs}


def arrow_type(field: InputField, integers: bool = True) -> pa.DataType:
    """The Arrow type a field's values are read into: numbers as int64 (integer inputs, where the
    format has integers) or float64, booleans, strings; a list of those for a vector field."""
    kind = field.kind
    if kind == BOOLEAN:
        item = pa.bool_()
    elif kind == TEXT:
        item = pa.string()
    else:
        item = pa.int64() if integers and field.spec.dtype in INTS else pa.float64()
    return pa.list_(item) if field.vector else item


def nested_schema(fields: Sequence[InputField], integers: bool = True) -> pa.Schema:
    """An Arrow schema holding every field at its path: struct columns for the objects on the way."""
    tree: dict[str, Any] = {}
    for field in fields:
        node = tree
        for part in field.parts[:-1]:
            node = node.setdefault(part, {})
        node[field.parts[-1]] = arrow_type(field, integers)

    def build(node: dict[str, Any]) -> list[pa.Field]:
        return [pa.field(k, pa.struct(build(v)) if isinstance(v, dict) else v) for k, v in node.items()]

    return pa.schema(build(tree))


def column_at(table: pa.Table, field: InputField) -> pa.Array:
    """The field's column of a table shaped by :func:`nested_schema` (null where an object on the path is null)."""
    head, *rest = field.parts
    column = table.column(head).combine_chunks()
    return pc.struct_field(column, rest) if rest else column


_PY_KINDS: dict[str, tuple[type, ...]] = {NUMBER: (int, float), BOOLEAN: (bool,), TEXT: (str,)}
_NONE = type(None)


def _arrow_type_name(kind: pa.DataType) -> str:
    if pa.types.is_boolean(kind):
        return "boolean"
    if pa.types.is_integer(kind) or pa.types.is_floating(kind):
        return "number"
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return "string"
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return "array"
    if pa.types.is_struct(kind):
        return "object"
    return str(kind)


def _fits(kind: pa.DataType, wanted: str) -> bool:
    return _arrow_type_name(kind) == wanted


def _from_python(values: list, item_kind: str, vector: bool) -> tuple[pa.Array, np.ndarray]:
    """A Python column as an Arrow array, and per row whether it held a value of the wrong type
    (which is null in the array). Numbers stay int64 when every one is an int."""
    wanted = _PY_KINDS[item_kind]
    if vector:
        types = set(map(type, values))
        if types <= {list, _NONE}:
            items = set(map(type, itertools.chain.from_iterable(v for v in values if v is not None)))
            if _types_fit(items, wanted):
                try:
                    return pa.array(values, pa.list_(_python_arrow_type(items, item_kind))), np.zeros(len(values), bool)
                except (OverflowError, pa.ArrowException):
                    pass
        wrong = np.array(
            [v is not None and (type(v) is not list or not _types_fit(set(map(type, v)), wanted)) for v in values], dtype=bool
        )
        cleaned = [None if bad else v for v, bad in zip(values, wrong)]
        if item_kind == NUMBER:  # doubles: integers beyond int64 included
            cleaned = [None if v is None else [float(x) for x in v] for v in cleaned]
        items = set(map(type, itertools.chain.from_iterable(v for v in cleaned if v is not None)))
        return pa.array(cleaned, pa.list_(_python_arrow_type(items, item_kind))), wrong
    wrong = np.zeros(len(values), bool)
    if not _types_fit(set(map(type, values)), wanted):
        wrong = np.array([v is not None and type(v) not in wanted for v in values], dtype=bool)
        values = [None if bad else v for v, bad in zip(values, wrong)]
    types = set(map(type, values))
    try:
        return pa.array(values, _python_arrow_type(types, item_kind)), wrong
    except OverflowError:  # an integer beyond int64: every number as a double
        return pa.array([None if v is None else float(v) for v in values], pa.float64()), wrong


def _types_fit(types: set[type], wanted: tuple[type, ...]) -> bool:
    return all(t in wanted or t is _NONE for t in types)


def _python_arrow_type(types: set[type], item_kind: str) -> pa.DataType:
    if item_kind == BOOLEAN:
        return pa.bool_()
    if item_kind == TEXT:
        return pa.string()
    return pa.float64() if float in types else pa.int64()


def _to_array(field: InputField, values: Column) -> tuple[pa.Array, np.ndarray | None]:
    if isinstance(values, list):
        return _from_python(values, field.kind, field.vector)
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    return values, None


def _reject(errors: Rejections, positions: np.ndarray, rows: np.ndarray, error_class: str, message: str) -> None:
    for position in positions[rows]:
        errors.add(position, error_class, message)


def _present(
    field: InputField, values: Column, positions: np.ndarray, keep: np.ndarray, errors: Rejections, expected: str
) -> pa.Array:
    """``values`` as an Arrow array; rows whose value is of the wrong JSON kind (WrongType: not ``expected``)
    or missing (MissingFeature) are rejected and cleared from ``keep``."""
    array, wrong = _to_array(field, values)
    what = field.describe()
    if wrong is not None:
        _reject(errors, positions, keep & wrong, WRONG_TYPE, f"{what} is not {expected}")
        keep &= ~wrong
    missing = array.is_null().to_numpy(zero_copy_only=False) if len(array) else np.zeros(0, bool)
    if wrong is not None:
        missing &= ~wrong
    _reject(errors, positions, keep & missing, MISSING_FEATURE, f"{what} is missing or null")
    keep &= ~missing
    return array


def _scalar_into(
    field: InputField, values: Column, matrix: np.ndarray, j: int, positions: np.ndarray, keep: np.ndarray, errors: Rejections
) -> None:
    array = _present(field, values, positions, keep, errors, f"a {field.kind}")
    what = field.describe()
    if not _fits(array.type, field.kind):
        _reject(errors, positions, keep, WRONG_TYPE, f"{what} is a {_arrow_type_name(array.type)}, not a {field.kind}")
        keep[:] = False
        return
    typed, problems = _typed(array, field.spec.dtype)
    for bad, error_class, message in problems:
        _reject(errors, positions, keep & bad, error_class, f"{what} {message}")
        keep &= ~bad
    matrix[:, j] = typed


def _vector_into(
    field: InputField, values: Column, matrix: np.ndarray, positions: np.ndarray, keep: np.ndarray, errors: Rejections
) -> None:
    array = _present(field, values, positions, keep, errors, f"an array of {field.kind}s")
    what = field.describe()
    width = field.spec.width
    if not (pa.types.is_list(array.type) or pa.types.is_large_list(array.type)):
        _reject(errors, positions, keep, WRONG_TYPE, f"{what} is a {_arrow_type_name(array.type)}, not an array of {field.kind}s")
        keep[:] = False
        return
    lengths = pc.fill_null(pc.list_value_length(array), 0).to_numpy(zero_copy_only=False) if len(array) else np.zeros(0, np.int64)
    short = keep & (lengths != width)
    for position, length in zip(positions[short], lengths[short]):
        errors.add(position, WRONG_LENGTH, f"{what} has {int(length)} values; needs {width}")
    keep &= ~short
    if not _fits(array.type.value_type, field.kind):
        _reject(errors, positions, keep, WRONG_TYPE, f"{what} holds {_arrow_type_name(array.type.value_type)}s, not {field.kind}s")
        keep[:] = False
        return
    holed = _list_has_null(array)
    _reject(errors, positions, keep & holed, WRONG_TYPE, f"{what} holds a null instead of a {field.kind}")
    keep &= ~holed
    if not keep.any():
        return
    selected = array.filter(pa.array(keep))
    typed, problems = _typed(pc.list_flatten(selected), field.spec.dtype)
    rows = np.flatnonzero(keep)
    matrix[rows] = typed.reshape(-1, width)
    for bad, error_class, message in problems:
        bad_rows = rows[bad.reshape(-1, width).any(axis=1) & keep[rows]]
        _reject(errors, positions, bad_rows, error_class, f"{what}: a value {message}")
        keep[bad_rows] = False


def _typed(array: pa.Array, dtype: str) -> tuple[np.ndarray, list[tuple[np.ndarray, str, str]]]:
    """``array`` (nulls read as 0) in ``dtype``, and the values that cannot be: (mask, class, message)."""
    n = len(array)
    if dtype == STRING:
        return np.asarray(array.to_numpy(zero_copy_only=False), dtype=object), []
    if dtype == BOOL:
        return pc.fill_null(array, False).to_numpy(zero_copy_only=False).astype(bool), []
    raw = pc.fill_null(array, 0).to_numpy(zero_copy_only=False) if n else np.zeros(0)
    target = np.dtype(dtype)
    if dtype in FLOATS:
        with np.errstate(over="ignore", invalid="ignore"):
            typed = raw.astype(target)
        bad = ~np.isfinite(typed)
        if raw.dtype.kind == "f":
            bad |= ~np.isfinite(raw)
        return typed, [(bad, NON_FINITE, f"is NaN, Infinity or too large for {dtype}")]
    info = np.iinfo(target)
    problems = []
    if raw.dtype.kind == "f":
        infinite = ~np.isfinite(raw)
        with np.errstate(invalid="ignore"):
            fraction = ~infinite & (np.floor(raw) != raw)
            outside = ~infinite & ~fraction & ((raw < info.min) | (raw >= float(info.max) + 1))  # 2**63 is exact, 2**63 - 1 is not
        problems.append((infinite, NON_FINITE, "is NaN or Infinity"))
        problems.append((fraction, WRONG_TYPE, f"is not a whole number (the input is {dtype})"))
        fraction |= infinite
    else:
        fraction = np.zeros(n, bool)
        outside = (raw < info.min) | (raw > info.max)
    problems.append((outside, NON_FINITE, f"is out of the range of {dtype}"))
    return np.where(fraction | outside, 0, raw).astype(target), problems


def _list_has_null(column: pa.Array) -> np.ndarray:
    """Per row of a list array: whether any element is null."""
    if len(column) == 0 or column.values.null_count == 0:
        return np.zeros(len(column), dtype=bool)
    counts = pc.fill_null(pc.list_value_length(column), 0).to_numpy()
    element_null = column.values.is_null().to_numpy(zero_copy_only=False)
    width = np.int64 if pa.types.is_large_list(column.type) else np.int32
    starts = np.frombuffer(column.buffers()[1], dtype=width)[column.offset : column.offset + len(column)].astype(np.int64)
    prefix = np.concatenate([[0], np.cumsum(element_null, dtype=np.int64)])
    return (prefix[starts + counts] - prefix[starts]) > 0
