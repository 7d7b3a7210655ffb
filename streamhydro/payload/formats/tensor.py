"""The ``tensor`` format: each record value is the raw little-endian float32 row of a single-input model,
exactly ``width * 4`` bytes. Runs in executor Python workers (decode) and in clients (encode).

The fastest format: a batch of good values is one numpy view over the Arrow data buffer.
``payload.max_value_bytes`` does not apply (values are always exactly one row).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from streamhydro.config import PayloadSettings
from streamhydro.errors import ModelError
from streamhydro.payload import EMPTY_VALUE, NON_FINITE, WRONG_TENSOR_LENGTH, Rejections
from streamhydro.payload import formats
from streamhydro.payload.fields import FLOATS
from streamhydro.registry import Manifest


class Decoder(formats.Decoder):
    def __init__(self, manifest: Manifest, settings: PayloadSettings) -> None:
        super().__init__(manifest, settings)
        label = f"{manifest.name}:{manifest.version}"
        if len(manifest.inputs) != 1:
            raise ModelError(
                label, f"payload 'tensor' feeds exactly one input; the model has {len(manifest.inputs)}: use payload format 'json'"
            )
        if manifest.inputs[0].dtype not in FLOATS:
            raise ModelError(
                label, f"payload 'tensor' carries float32 values; input '{manifest.inputs[0].name}' is {manifest.inputs[0].dtype}: use payload format 'json'"
            )
        self.spec = manifest.inputs[0]

    def _decode(self, values: pa.Array) -> formats.Decoded:
        spec = self.spec
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
                    f"tensor value has {got} bytes; input '{spec.name}' needs {expected} ({spec.width} little-endian float32)",
                )
        good = np.flatnonzero(ok)
        rows = _float32_rows(good_values, spec.width)
        dtype = np.dtype(spec.dtype)
        with np.errstate(over="ignore", invalid="ignore"):
            typed = rows.astype(dtype, copy=False)
        finite = np.isfinite(typed).all(axis=1)
        for position in good[~finite]:
            errors.add(position, NON_FINITE, f"tensor for input '{spec.name}' holds NaN or Infinity, or overflows {spec.dtype}")
        inputs = {spec.name: np.ascontiguousarray(typed[finite]).reshape((int(finite.sum()), *spec.shape[1:]))}
        return self.finish(errors, inputs, good[finite])


def encode(rows: np.ndarray) -> list[bytes]:
    """Tensor values of a (n, width) matrix: one little-endian float32 row each."""
    n = len(rows)
    data = np.ascontiguousarray(rows, dtype="<f4").reshape(n, -1)
    row_bytes = data.shape[1] * 4
    raw = data.tobytes()
    return [raw[i * row_bytes : (i + 1) * row_bytes] for i in range(n)]


def _float32_rows(values: pa.Array, width: int) -> np.ndarray:
    """A (n, width) float32 matrix over the data buffer of a binary array of width*4-byte values."""
    if len(values) == 0:
        return np.zeros((0, width), dtype=np.float32)
    offsets = formats.offsets(values)
    data = np.frombuffer(values.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    return data.view("<f4").reshape(len(values), width)
