"""The prediction JSON of each model kind: model outputs -> the value of ``"prediction"``.

Runs in executor Python workers (inside :class:`~streamhydro.payload.encoding.Encoder`, once per
encoded batch) and on the driver (``streamhydro models show`` prints :meth:`Prediction.schema`).
One small class per kind (``streamhydro.registry.KINDS``), chosen by :func:`prediction_for`; each
turns the manifest outputs, as ``{name: (rows, width) array}``, into JSON fragments built
column-wise with Arrow kernels (:mod:`.jsontext`). Per kind::

    classifier  {"label": "<labels[argmax]>", "scores": {"<label>": p, ...}}
    regressor   {"value": x}                          width 1
                {"values": {"<target>": x, ...}}      width k, with targets
                {"values": [x1, ..., xk]}             width k, without targets
    score       {"score": x}
    embedding   {"embedding": [x1, ..., xk]}
    outputs     {"<output name>": v, ...}             every output: width 1 a scalar, else a list

Floats that are NaN or infinite are ``null``; integer outputs are JSON integers, bools
``true``/``false``, strings JSON strings. A classifier's label is that of the first largest score
(a NaN score counts as the largest, as in ``numpy.argmax``).
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from streamhydro.payload.jsontext import rows_json, values_json
from streamhydro.registry import (
    KIND_CLASSIFIER,
    KIND_EMBEDDING,
    KIND_OUTPUTS,
    KIND_REGRESSOR,
    KIND_SCORE,
    Manifest,
    TensorSpec,
)

Parts = list[pa.Array | str]
_JSON_TYPES = {"float16": "number", "float32": "number", "float64": "number", "int32": "integer", "int64": "integer",
               "bool": "boolean", "string": "string"}


class Prediction:
    """One kind's prediction JSON for one manifest. Built once per session; cheap to call."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.output = manifest.outputs[0]

    def parts(self, outputs: dict[str, np.ndarray]) -> Parts:
        """JSON fragments, joined element-wise, that make each row's prediction object.

        ``outputs`` holds every manifest output as a ``(rows, width)`` array.
        """
        raise NotImplementedError

    def schema(self) -> str:
        """The prediction object's shape, for people: JSON with value types in place of values."""
        raise NotImplementedError


def _value_schema(spec: TensorSpec) -> str:
    kind = _JSON_TYPES[spec.dtype]
    return kind if spec.width == 1 else f"[{kind} x {spec.width}]"


def _keyed(keys: tuple[str, ...], matrix: np.ndarray) -> Parts:
    """``"k1":v1,"k2":v2,...`` over the columns of ``matrix``."""
    parts: Parts = []
    for j, key in enumerate(keys):
        parts += [("" if j == 0 else ",") + json.dumps(key) + ":", values_json(matrix[:, j])]
    return parts


class Classifier(Prediction):
    def __init__(self, manifest: Manifest) -> None:
        super().__init__(manifest)
        self._label_json = pa.array([json.dumps(label) for label in manifest.labels], pa.string())

    def parts(self, outputs: dict[str, np.ndarray]) -> Parts:
        scores = outputs[self.output.name]
        best = np.argmax(scores, axis=1) if len(scores) else np.zeros(0, np.int64)
        return ['{"label":', self._label_json.take(pa.array(best)), ',"scores":{', *_keyed(self.manifest.labels, scores), "}}"]

    def schema(self) -> str:
        labels = " | ".join(json.dumps(label) for label in self.manifest.labels)
        scores = ", ".join(f"{json.dumps(label)}: number" for label in self.manifest.labels)
        return f'{{"label": {labels}, "scores": {{{scores}}}}}'


class Regressor(Prediction):
    def parts(self, outputs: dict[str, np.ndarray]) -> Parts:
        values = outputs[self.output.name]
        if self.output.width == 1:
            return ['{"value":', values_json(values[:, 0]), "}"]
        if self.manifest.targets:
            return ['{"values":{', *_keyed(self.manifest.targets, values), "}}"]
        return ['{"values":', rows_json(values), "}"]

    def schema(self) -> str:
        kind = _JSON_TYPES[self.output.dtype]
        if self.output.width == 1:
            return f'{{"value": {kind}}}'
        if self.manifest.targets:
            return '{"values": {' + ", ".join(f"{json.dumps(t)}: {kind}" for t in self.manifest.targets) + "}}"
        return f'{{"values": {_value_schema(self.output)}}}'


class Score(Prediction):
    def parts(self, outputs: dict[str, np.ndarray]) -> Parts:
        return ['{"score":', values_json(outputs[self.output.name][:, 0]), "}"]

    def schema(self) -> str:
        return f'{{"score": {_JSON_TYPES[self.output.dtype]}}}'


class Embedding(Prediction):
    def parts(self, outputs: dict[str, np.ndarray]) -> Parts:
        return ['{"embedding":', rows_json(outputs[self.output.name]), "}"]

    def schema(self) -> str:
        return f'{{"embedding": [{_JSON_TYPES[self.output.dtype]} x {self.output.width}]}}'


class Outputs(Prediction):
    def parts(self, outputs: dict[str, np.ndarray]) -> Parts:
        parts: Parts = []
        for j, spec in enumerate(self.manifest.outputs):
            values = outputs[spec.name]
            parts += [("{" if j == 0 else ",") + json.dumps(spec.name) + ":"]
            parts.append(values_json(values[:, 0]) if spec.width == 1 else rows_json(values))
        return [*parts, "}"]

    def schema(self) -> str:
        return "{" + ", ".join(f"{json.dumps(spec.name)}: {_value_schema(spec)}" for spec in self.manifest.outputs) + "}"


_KINDS: dict[str, type[Prediction]] = {
    KIND_CLASSIFIER: Classifier,
    KIND_REGRESSOR: Regressor,
    KIND_SCORE: Score,
    KIND_EMBEDDING: Embedding,
    KIND_OUTPUTS: Outputs,
}


def prediction_for(manifest: Manifest) -> Prediction:
    """The prediction writer of ``manifest.kind`` (a checked manifest names a known kind)."""
    return _KINDS[manifest.kind](manifest)
