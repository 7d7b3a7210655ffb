"""JSON text, column-wise: Arrow kernels that turn numpy/Arrow columns into JSON fragments, one per row.

Runs in executor Python workers, inside the encoders (:mod:`.encoding`, :mod:`.predictions`).
Pure pyarrow/numpy; no per-row Python on the common path. Every function returns a ``pa.string()``
array of ``n`` JSON texts, ready for ``pc.binary_join_element_wise``.

Numbers: floats as Arrow writes them (shortest round-trip form, ``1e+20``), NaN and infinities
as ``null``; integers as JSON integers; bools as ``true``/``false``; strings quoted and escaped.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def json_string_body(text: pa.Array) -> pa.Array:
    """Escape a UTF-8 string array for use between JSON quotes (backslash, quote, control chars)."""
    escaped = pc.replace_substring(pc.replace_substring(text, "\\", "\\\\"), '"', '\\"')
    controls = pc.fill_null(pc.match_substring_regex(escaped, r"[\x00-\x1f]"), False)
    if not pc.any(controls).as_py():
        return escaped
    rows = escaped.to_pylist()
    for i in np.flatnonzero(controls.to_numpy(zero_copy_only=False)):
        rows[i] = json.dumps(text[int(i)].as_py())[1:-1]
    return pa.array(rows, pa.string())


def values_json(values: np.ndarray) -> pa.Array:
    """One JSON value per element of a 1-D array: float (non-finite -> null), int, bool or str."""
    if values.dtype == object or values.dtype.kind in "US":
        text = pa.array(values.astype(object), pa.string())
        return pc.binary_join_element_wise('"', json_string_body(text), '"', "")
    array = pa.array(values.astype(np.float32) if values.dtype == np.float16 else values)
    text = pc.cast(array, pa.string())
    if values.dtype.kind != "f":
        return text
    finite = pc.is_finite(array)
    return text if pc.all(finite).as_py() else pc.if_else(finite, text, "null")


def rows_json(matrix: np.ndarray) -> pa.Array:
    """One JSON array per row of a 2-D array (``[v1,v2,...]``): one cast of the flattened values,
    list offsets over them, and one join per row."""
    n, width = matrix.shape
    flat = values_json(np.ascontiguousarray(matrix).reshape(-1))
    offsets = pa.array(np.arange(0, n * width + 1, width, dtype=np.int32))
    joined = pc.binary_join(pa.ListArray.from_arrays(offsets, flat), ",")
    return pc.binary_join_element_wise("[", joined, "]", "")
