"""Tiny ONNX models and Kafka-like Arrow batches for the payload, engine and scoring tests.

A helper module (no tests): models are built with onnx.helper so the tests never depend on the
shipped demo model.
"""

from __future__ import annotations

import datetime
import json
import types
from collections.abc import Sequence

import numpy as np
import onnx
import pyarrow as pa
from onnx import TensorProto, helper, numpy_helper

from streamhydro.payload import HEADERS_TYPE
from streamhydro.registry import Manifest, TensorSpec, sha256_bytes

LABELS = ("neg", "pos", "odd")


def softmax_model(specs: Sequence[TensorSpec], labels: Sequence[str] = LABELS, seed: int = 0) -> tuple[bytes, Manifest]:
    """softmax(concat(flatten(inputs)) @ W + b): a real classifier shape with random weights."""
    rng = np.random.default_rng(seed)
    width = sum(spec.width for spec in specs)
    weights = rng.normal(size=(width, len(labels))).astype(np.float32)
    bias = rng.normal(size=(len(labels),)).astype(np.float32)
    nodes = []
    flat = []
    for spec in specs:
        nodes.append(helper.make_node("Flatten", [spec.name], [f"{spec.name}_flat"], axis=1))
        flat.append(f"{spec.name}_flat")
    nodes.append(helper.make_node("Concat", flat, ["joined"], axis=1))
    nodes.append(helper.make_node("MatMul", ["joined", "W"], ["logits0"]))
    nodes.append(helper.make_node("Add", ["logits0", "b"], ["logits"]))
    nodes.append(helper.make_node("Softmax", ["logits"], ["scores"], axis=1))
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info(s.name, TensorProto.FLOAT, ["n", *s.shape[1:]]) for s in specs],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", len(labels)])],
        initializer=[numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    data = model.SerializeToString()
    manifest = Manifest(
        name="tiny",
        version=1,
        sha256=sha256_bytes(data),
        inputs=tuple(specs),
        outputs=(TensorSpec("scores", "float32", (-1, len(labels))),),
        labels=tuple(labels),
        created="2026-01-01T00:00:00Z",
    )
    return data, manifest


def mixed_manifest(name: str = "mixed", vector: str = "float32", count: str = "int64") -> Manifest:
    """A manifest (with no model behind it) whose inputs read nested JSON fields of every kind: two numbers,
    a ``vector``-typed array, a text, a boolean and a ``count``-typed integer."""
    return Manifest(
        name=name, version=1, sha256="0" * 64, labels=("a", "b"), created="2026-01-01T00:00:00Z",
        inputs=(
            TensorSpec("num", "float32", (-1, 2), ("user.age", "tx.amount")),
            TensorSpec("vec", vector, (-1, 3), field="doc.embedding"),
            TensorSpec("city", "string", (-1, 1), ("user.city",)),
            TensorSpec("flag", "bool", (-1,), ("vip",)),
            TensorSpec("count", count, (-1, 1), ("tx.items",)),
        ),
        outputs=(TensorSpec("scores", "float32", (-1, 2)),),
    )


def feature_spec(name: str = "x", n: int = 4) -> TensorSpec:
    return TensorSpec(name, "float32", (-1, n), tuple(f"{name}_f{i}" for i in range(n)))


def kafka_batch(values: Sequence[bytes | None], keys: Sequence[bytes | None] | None = None, topic: str = "in", first_offset: int = 0) -> pa.RecordBatch:
    """A batch with the columns of Spark's Kafka source."""
    n = len(values)
    keys = list(keys) if keys is not None else [f"k{first_offset + i}".encode() for i in range(n)]
    stamp = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    return pa.RecordBatch.from_pydict(
        {
            "key": pa.array(keys, pa.binary()),
            "value": pa.array(values, pa.binary()),
            "topic": pa.array([topic] * n, pa.string()),
            "partition": pa.array([first_offset % 3] * n, pa.int32()),
            "offset": pa.array(range(first_offset, first_offset + n), pa.int64()),
            "timestamp": pa.array([stamp + datetime.timedelta(milliseconds=i) for i in range(n)], pa.timestamp("us", tz="UTC")),
            "timestampType": pa.array([0] * n, pa.int32()),
            "headers": pa.array([[{"key": "trace", "value": f"t{i}".encode()}] for i in range(n)], HEADERS_TYPE),
        }
    )


def json_values(manifest: Manifest, rows: np.ndarray) -> list[bytes]:
    """JSON payloads for a single-input feature model, one per row of ``rows``."""
    spec = manifest.inputs[0]
    return [json.dumps(dict(zip(spec.features, map(float, row)))).encode() for row in rows]


def Holder(value: bytes) -> types.SimpleNamespace:  # noqa: N802 -- reads like the Broadcast it stands for
    """Stands in for a Broadcast: an object whose .value is the model bytes (picklable without this module)."""
    return types.SimpleNamespace(value=value)


def typed_inputs_model() -> tuple[bytes, Manifest]:
    """A classifier over a float input read from nested fields, a string input (1.0 when it is "Oslo")
    and a bool input: the input types beyond float, for decode-to-score tests."""
    nodes = [
        helper.make_node("Equal", ["city", "oslo"], ["is_oslo"]),
        helper.make_node("Cast", ["is_oslo"], ["is_oslo_f"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["vip"], ["vip_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["vip_f", "one"], ["vip_2d"]),
        helper.make_node("Concat", ["x", "is_oslo_f", "vip_2d"], ["joined"], axis=1),
        helper.make_node("MatMul", ["joined", "W"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["scores"], axis=1),
    ]
    weights = np.array([[1, 0], [0, 1], [2, 0], [0, 3]], np.float32)
    graph = helper.make_graph(
        nodes,
        "typed",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2]),
            helper.make_tensor_value_info("city", TensorProto.STRING, ["n", 1]),
            helper.make_tensor_value_info("vip", TensorProto.BOOL, ["n"]),
        ],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", 2])],
        initializer=[
            numpy_helper.from_array(np.array(["Oslo"], dtype=object), "oslo"),
            numpy_helper.from_array(weights, "W"),
            numpy_helper.from_array(np.array([1], np.int64), "one"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])  # Equal on strings: opset 19
    model.ir_version = 9
    onnx.checker.check_model(model)
    data = model.SerializeToString()
    manifest = Manifest(
        name="typed",
        version=1,
        sha256=sha256_bytes(data),
        inputs=(
            TensorSpec("x", "float32", (-1, 2), ("user.age", "tx.amount")),
            TensorSpec("city", "string", (-1, 1), ("user.city",)),
            TensorSpec("vip", "bool", (-1,), ("vip",)),
        ),
        outputs=(TensorSpec("scores", "float32", (-1, 2)),),
        labels=("a", "b"),
        created="2026-01-01T00:00:00Z",
    )
    return data, manifest
