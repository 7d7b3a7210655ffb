"""Prediction JSON per model kind, as properties over kinds, widths, dtypes and non-finite values:
the encoder's output is always valid JSON of the documented shape, holding the values given.
Pure pyarrow/numpy: no ONNX Runtime, no Spark."""

from __future__ import annotations

import json
import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from _inference_models import kafka_batch
from streamhydro.payload.encoding import Encoder
from streamhydro.registry import DTYPES, FLOAT_DTYPES, NUMERIC_DTYPES, Manifest, TensorSpec, numpy_dtype

FAST = settings(max_examples=150, deadline=None)
names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=6)


@st.composite
def column(draw, dtype: str, n: int, width: int) -> np.ndarray:
    """``n`` rows of ``width`` values of ``dtype``, floats including NaN and infinities."""
    size = n * width
    if dtype in FLOAT_DTYPES:
        bits = {"float16": 16, "float32": 32, "float64": 64}[dtype]
        values = draw(st.lists(st.floats(width=bits), min_size=size, max_size=size))
    elif dtype in ("int32", "int64"):
        info = np.iinfo(numpy_dtype(dtype))
        values = draw(st.lists(st.integers(int(info.min), int(info.max)), min_size=size, max_size=size))
    elif dtype == "bool":
        values = draw(st.lists(st.booleans(), min_size=size, max_size=size))
    else:
        values = draw(st.lists(st.text(max_size=5), min_size=size, max_size=size))
    return np.array(values, dtype=numpy_dtype(dtype)).reshape(n, width)


@st.composite
def model_outputs(draw) -> tuple[Manifest, dict[str, np.ndarray]]:
    """A manifest of any kind with matching outputs of ``n`` rows."""
    kind = draw(st.sampled_from(("classifier", "regressor", "score", "embedding", "outputs")))
    n = draw(st.integers(1, 5))
    labels: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    if kind == "outputs":
        out_names = draw(st.lists(names, min_size=1, max_size=3, unique=True))
        specs = [TensorSpec(name, draw(st.sampled_from(tuple(DTYPES))), (-1, draw(st.integers(1, 4)))) for name in out_names]
    else:
        dtype = draw(st.sampled_from(FLOAT_DTYPES if kind == "classifier" else NUMERIC_DTYPES))
        width = 1 if kind == "score" else draw(st.integers(1, 5))
        specs = [TensorSpec("out", dtype, (-1, width))]
        if kind == "classifier":
            labels = tuple(draw(st.lists(names, min_size=width, max_size=width, unique=True)))
        if kind == "regressor" and width > 1 and draw(st.booleans()):
            targets = tuple(draw(st.lists(names, min_size=width, max_size=width, unique=True)))
    manifest = Manifest(
        name="m", version=1, sha256="", inputs=(TensorSpec("x", "float32", (-1, 1)),), outputs=tuple(specs),
        labels=labels, targets=targets, kind=kind, created="2026-01-01T00:00:00Z",
    )
    manifest.check()
    outputs = {spec.name: draw(column(spec.dtype, n, spec.width)) for spec in specs}
    return manifest, outputs


def same(written, value) -> bool:
    """Whether a JSON value is what the encoder must write for ``value``."""
    if isinstance(value, np.floating):
        if not math.isfinite(value):
            return written is None
        return isinstance(written, (int, float)) and type(value)(written) == value
    if isinstance(value, np.bool_):
        return written is bool(value)
    if isinstance(value, np.integer):
        return isinstance(written, int) and not isinstance(written, bool) and written == int(value)
    return written == value


def same_row(written, row: np.ndarray) -> bool:
    return isinstance(written, list) and len(written) == len(row) and all(same(w, v) for w, v in zip(written, row))


@FAST
@given(model_outputs())
def test_every_kind_writes_valid_json_of_its_documented_shape(case):
    manifest, outputs = case
    n = len(next(iter(outputs.values())))
    out, rejected = Encoder(manifest, "preds", "dead").predictions(kafka_batch([b"{}"] * n), outputs)
    assert rejected.rows.size == 0
    docs = [json.loads(value.decode("utf-8")) for value in out.column("value").to_pylist()]
    spec = manifest.outputs[0]
    for i, doc in enumerate(docs):
        assert set(doc) == {"key", "prediction", "model", "source", "idempotency_key"}
        prediction = doc["prediction"]
        row = outputs[spec.name][i]
        if manifest.kind == "classifier":
            assert set(prediction) == {"label", "scores"}
            assert prediction["label"] == manifest.labels[int(np.argmax(row))]
            assert list(prediction["scores"]) == list(manifest.labels)
            assert all(same(prediction["scores"][label], v) for label, v in zip(manifest.labels, row))
        elif manifest.kind == "regressor" and spec.width == 1:
            assert set(prediction) == {"value"} and same(prediction["value"], row[0])
        elif manifest.kind == "regressor" and manifest.targets:
            assert list(prediction) == ["values"] and list(prediction["values"]) == list(manifest.targets)
            assert all(same(prediction["values"][t], v) for t, v in zip(manifest.targets, row))
        elif manifest.kind == "regressor":
            assert list(prediction) == ["values"] and same_row(prediction["values"], row)
        elif manifest.kind == "score":
            assert list(prediction) == ["score"] and same(prediction["score"], row[0])
        elif manifest.kind == "embedding":
            assert list(prediction) == ["embedding"] and same_row(prediction["embedding"], row)
        else:
            assert list(prediction) == [o.name for o in manifest.outputs]
            for o in manifest.outputs:
                values = outputs[o.name][i]
                written = prediction[o.name]
                assert same(written, values[0]) if o.width == 1 else same_row(written, values)
