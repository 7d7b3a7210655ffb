"""A user's own model on the user's own events, end to end.

Real converters make the models (skl2onnx, onnxmltools for XGBoost and LightGBM, torch.onnx), each is
added with ``add_model`` (what ``streamhydro models add`` runs) with a mapping onto nested event
fields, and events are written as users' producers write them: JSON text; Avro and Protobuf through
confluent-kafka's own serializers against a real schema registry (Apicurio, Confluent API), or bare
with a fixed schema file; raw float32 tensors. They are produced to Apache Kafka while ``serve`` runs
(real local Spark, both connectors), with a few malformed records among them. Every prediction is
compared with ONNX Runtime run directly on the *original* model file (before ``models add`` rewrote a
ZipMap) with the same inputs, and every malformed record must come out as a dead letter.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

import _converted_models as converted
from conftest import client, read_all, send
from streamhydro.config import Config
from streamhydro.driver.serve import Service
from streamhydro.kafka.admin import ensure_topics
from streamhydro.models_add import add_model
from streamhydro.registry import Registry

pytestmark = [pytest.mark.spark, pytest.mark.broker, pytest.mark.slow]

REPEATS = 5  # events per training row of the converted model
# Empty; the wire format's magic byte with a schema id no registry here hands out; truncated JSON.
BAD_VALUES = (b"", b"\x00\x7f\xff\xff\xf0not an event", b"{\"truncated\": ")
TOLERANCE = 1e-5


@dataclasses.dataclass(frozen=True)
class Model:
    """A converted model, how ``models add`` is told to map it, and what ORT's outputs mean in a prediction."""

    name: str
    build: Callable[[], converted.Converted]
    mapping: dict[str, dict[str, Any]]
    expected: Callable[[dict[str, Any], int], dict[str, Any]]  # ORT outputs of the original model, row -> prediction


def _scores(outputs: dict[str, Any], row: int, name: str) -> dict[str, Any]:
    """A classifier's prediction from the original model's probabilities (a ZipMap list or a tensor)."""
    probabilities = outputs[name][row]
    if isinstance(probabilities, dict):
        scores = {str(label): float(p) for label, p in probabilities.items()}
    else:
        scores = {str(label): float(p) for label, p in enumerate(probabilities)}
    return {"label": max(scores, key=scores.get), "scores": scores}


MODELS = {
    "sklearn": Model(
        "churn",
        converted.sklearn_pipeline,
        {"city": {"features": ["user.city"]}, "age": {"features": ["user.age"]}, "amount": {"features": ["tx.amount"]}},
        lambda outputs, row: _scores(outputs, row, "output_probability"),
    ),
    "xgboost": Model(
        "tiers",
        converted.xgboost_classifier,
        {"input": {"features": ["sensor.a", "sensor.b", "reading.c", "reading.d"]}},
        lambda outputs, row: _scores(outputs, row, "probabilities"),
    ),
    "lightgbm": Model(
        "yield",
        converted.lightgbm_regressor,
        {"input": {"field": "measurements.values"}},
        lambda outputs, row: {"value": float(outputs["variable"][row][0])},
    ),
    "torch": Model(
        "risk",
        converted.torch_two_outputs,
        {"x": {"features": ["x0", "x1", "x2", "x3", "x4"]}},
        lambda outputs, row: {"score": float(outputs["score"][row][0]), "embedding": outputs["embedding"][row].tolist()},
    ),
}

# (model, payload format, where the schema comes from, connector): every model in at least two formats,
# every format with both connectors (tensor: single float input models only).
CASES = [
    ("sklearn", "avro", "registry", "python"),
    ("sklearn", "json", None, "builtin"),
    ("xgboost", "protobuf", "registry", "builtin"),
    ("xgboost", "avro", "file", "python"),
    ("lightgbm", "protobuf", "file", "python"),
    ("lightgbm", "tensor", None, "builtin"),
    ("torch", "json", None, "python"),
    ("torch", "avro", "registry", "builtin"),
]


def _set(event: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for part in parents:
        event = event.setdefault(part, {})
    event[leaf] = value


def _python(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def events_of(manifest, feeds: dict[str, np.ndarray], rows: int) -> list[dict[str, Any]]:
    """One nested event per row, each mapped path holding that row's value(s) of its input."""
    events = []
    for i in range(rows):
        event: dict[str, Any] = {"event_id": f"e-{i}"}
        for spec in manifest.inputs:
            row = feeds[spec.name][i].reshape(-1)
            if spec.features:
                for path, value in zip(spec.features, row, strict=True):
                    _set(event, path, _python(value))
            else:
                _set(event, spec.field or spec.name, [_python(v) for v in row])
        events.append(event)
    return events


def encode(
    fmt: str, origin: str | None, manifest, events, feeds, registry_url: str, topic: str, tmp_path
) -> tuple[list[bytes], dict[str, str]]:
    """The events as the user's producer writes them, and the ``[payload]`` settings that read them."""
    from streamhydro.payload.formats import avro as avro_format
    from streamhydro.payload.formats import protobuf as protobuf_format

    if fmt == "json":
        return [json.dumps(e).encode() for e in events], {"format": "json"}
    if fmt == "tensor":
        [spec] = manifest.inputs
        return [row.astype("<f4").tobytes() for row in feeds[spec.name]], {"format": "tensor"}
    if fmt == "avro":
        schema = avro_format.schema_for(manifest)
        schema["fields"].append({"name": "event_id", "type": "string"})
        if origin == "registry":
            from confluent_kafka.schema_registry import SchemaRegistryClient
            from confluent_kafka.schema_registry.avro import AvroSerializer
            from confluent_kafka.serialization import MessageField, SerializationContext

            serializer = AvroSerializer(SchemaRegistryClient({"url": registry_url}), json.dumps(schema))
            context = SerializationContext(topic, MessageField.VALUE)
            return [serializer(e, context) for e in events], {"format": "avro", "schema_registry_url": registry_url}
        import io

        import fastavro

        parsed = fastavro.parse_schema(schema)
        path = tmp_path / "events.avsc"
        path.write_text(json.dumps(schema))
        values = []
        for e in events:
            buffer = io.BytesIO()
            fastavro.schemaless_writer(buffer, parsed, e)
            values.append(buffer.getvalue())
        return values, {"format": "avro", "schema": str(path)}
    proto = protobuf_format.proto_for(manifest)
    message_class = protobuf_format.message_class(proto)
    from google.protobuf.json_format import ParseDict

    messages = [ParseDict({k: v for k, v in e.items() if k != "event_id"}, message_class()) for e in events]
    if origin == "registry":
        from confluent_kafka.schema_registry import SchemaRegistryClient
        from confluent_kafka.schema_registry.protobuf import ProtobufSerializer
        from confluent_kafka.serialization import MessageField, SerializationContext

        serializer = ProtobufSerializer(message_class, SchemaRegistryClient({"url": registry_url}), {"use.deprecated.format": False})
        context = SerializationContext(topic, MessageField.VALUE)
        return [serializer(m, context) for m in messages], {"format": "protobuf", "schema_registry_url": registry_url}
    path = tmp_path / "events.proto"
    path.write_text(proto)
    return [m.SerializeToString() for m in messages], {"format": "protobuf", "schema": str(path)}


@pytest.mark.parametrize(("model_key", "fmt", "origin", "connector"), CASES, ids=["-".join(filter(None, c)) for c in CASES])
def test_a_converted_model_scores_the_users_events_like_onnx_runtime(
    model_key, fmt, origin, connector, kafka_bootstrap, schema_registry_url, spark, topic_name, tmp_path
):
    model = MODELS[model_key]
    built = model.build()
    registry = Registry(tmp_path / "models")
    version = add_model(registry, built.onnx, model.name, mapping=model.mapping)
    manifest = version.manifest

    rows = len(next(iter(built.inputs.values())))
    feeds = {name: np.concatenate([array] * REPEATS) for name, array in built.inputs.items()}
    events = events_of(manifest, feeds, rows * REPEATS)
    topics = {"input": f"{topic_name}-in", "output": f"{topic_name}-out", "dlq": f"{topic_name}-dlq"}
    ensure_topics(client(kafka_bootstrap), {topics["input"]: 2, topics["output"]: 2, topics["dlq"]: 1})
    values, payload = encode(fmt, origin, manifest, events, feeds, schema_registry_url, topics["input"], tmp_path)

    service = Service(
        Config().replace(
            spark={"master": "local[2]", "checkpoint_location": str(tmp_path / "checkpoint")},
            kafka={"bootstrap_servers": kafka_bootstrap, "subscribe": topics["input"], "output_topic": topics["output"],
                   "dead_letter_topic": topics["dlq"], "source": connector},
            model={"registry": str(registry.root), "name": model.name, "version": "latest"},
            payload=payload,
            inference={"providers": ["CPUExecutionProvider"]},
            metrics={"enabled": False},
        )
    )
    service.start()
    try:
        # Produced while the query runs: the good events, then the malformed ones.
        keys = send(kafka_bootstrap, topics["input"], values)
        send(kafka_bootstrap, topics["input"], list(BAD_VALUES), first_key=len(values))
        records = read_all(kafka_bootstrap, topics["output"], len(values))
        dead = read_all(kafka_bootstrap, topics["dlq"], len(BAD_VALUES), seconds=60)
    finally:
        service.stop()

    assert len(records) == len(values), f"{len(records)} predictions for {len(values)} events; dead letters: {[dict(d.headers) for d in dead][:3]}"
    assert len(dead) == len(BAD_VALUES)
    assert all(dict(d.headers).get("streamhydro.error.class") for d in dead)

    original = ort.InferenceSession(built.onnx, providers=["CPUExecutionProvider"])
    names = [o.name for o in original.get_outputs()]
    outputs = dict(zip(names, original.run(None, feeds), strict=True))
    position = {key: i for i, key in enumerate(keys)}
    for record in records:
        body = json.loads(record.value)
        row = position[record.key]
        assert body["model"] == {"name": model.name, "version": manifest.version}
        _assert_close(body["prediction"], model.expected(outputs, row), f"{model_key} {fmt} row {row}")


def _assert_close(actual: Any, expected: Any, where: str) -> None:
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and set(actual) == set(expected), (where, actual, expected)
        for key in expected:
            _assert_close(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), (where, actual, expected)
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            _assert_close(a, e, f"{where}[{i}]")
    elif isinstance(expected, float):
        assert actual == pytest.approx(expected, rel=TOLERANCE, abs=TOLERANCE), (where, actual, expected)
    else:
        assert actual == expected, (where, actual, expected)
