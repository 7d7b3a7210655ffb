"""The service end to end: real local Spark, Apache Kafka, kafka-python as the users' client.

Every test runs with both connectors: streamhydro's Python data source and Spark's own JVM connector.
"""

from __future__ import annotations

import json
import time

import numpy as np
import onnxruntime as ort
import pytest

from conftest import client, read_all, send
from streamhydro.config import Config
from streamhydro.driver.serve import Service
from streamhydro.kafka.admin import ensure_topics
from streamhydro.producer import JSON_BAD_KINDS, TENSOR_BAD_KINDS, corrupt, make_values

pytestmark = [pytest.mark.spark, pytest.mark.broker, pytest.mark.slow]

OUTPUT_WAIT_SECONDS = 240


@pytest.fixture(params=["python", "builtin"])
def connector(request) -> str:
    return request.param


@pytest.fixture
def topics(kafka_bootstrap, topic_name):
    names = {"input": f"{topic_name}-in", "output": f"{topic_name}-out", "dlq": f"{topic_name}-dlq"}
    ensure_topics(client(kafka_bootstrap), {names["input"]: 2, names["output"]: 2, names["dlq"]: 1})
    return names


def service_config(kafka_bootstrap, topics, model_registry, tmp_path, connector, **kafka):
    return Config().replace(
        spark={"master": "local[2]", "checkpoint_location": str(tmp_path / "checkpoint")},
        kafka={
            "bootstrap_servers": kafka_bootstrap,
            "subscribe": topics["input"],
            "output_topic": topics["output"],
            "dead_letter_topic": topics["dlq"],
            "source": connector,
            **kafka,
        },
        model={"registry": str(model_registry.root), "name": "iris_like", "version": "latest"},
        inference={"providers": ["CPUExecutionProvider"], "batch_size": 1000},
        metrics={"enabled": False},
    )


def features_of(value: bytes, names) -> list[float]:
    document = json.loads(value)
    return [document[name] for name in names]


def test_every_event_is_predicted_exactly_like_onnx_runtime(kafka_bootstrap, topics, model_registry, tmp_path, spark, connector):
    model = model_registry.get("iris_like")
    values = make_values(model.manifest, "json", 20_000, np.random.default_rng(1))
    keys = send(kafka_bootstrap, topics["input"], values)
    service = Service(service_config(kafka_bootstrap, topics, model_registry, tmp_path, connector, max_offsets_per_trigger=8000))
    service.start()
    assert type(service.connector).__name__ == {"python": "PythonConnector", "builtin": "BuiltinConnector"}[connector]
    try:
        records = read_all(kafka_bootstrap, topics["output"], len(values))
    finally:
        service.stop()

    assert len(records) == len(values)
    assert read_all(kafka_bootstrap, topics["dlq"], 1, seconds=2) == []
    predictions = [json.loads(r.value) for r in records]
    assert len({p["idempotency_key"] for p in predictions}) == len(values)

    by_key = dict(zip(keys, values))
    names = model.manifest.inputs[0].features
    inputs = np.array([features_of(by_key[r.key], names) for r in records], dtype=np.float32)
    expected = ort.InferenceSession(model.path.read_bytes(), providers=["CPUExecutionProvider"]).run(None, {"features": inputs})[0]
    labels = model.manifest.labels
    scores = np.array([[p["prediction"]["scores"][label] for label in labels] for p in predictions])
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
    assert [p["prediction"]["label"] for p in predictions] == [labels[i] for i in expected.argmax(axis=1)]
    for record, prediction in zip(records, predictions):
        assert prediction["key"] == record.key.decode()
        assert prediction["model"] == {"name": "iris_like", "version": 1}
        source = prediction["source"]
        assert source["topic"] == topics["input"]
        assert prediction["idempotency_key"] == f"{source['topic']}/{source['partition']}/{source['offset']}"
        assert ("trace", sent_trace(record.key)) in record.headers


def test_restart_from_checkpoint_predicts_every_event(kafka_bootstrap, topics, model_registry, tmp_path, spark, connector):
    model = model_registry.get("iris_like")
    first = make_values(model.manifest, "json", 6000, np.random.default_rng(2))
    send(kafka_bootstrap, topics["input"], first)
    config = service_config(kafka_bootstrap, topics, model_registry, tmp_path, connector, max_offsets_per_trigger=500)
    service = Service(config)
    service.start()
    try:
        partial = read_all(kafka_bootstrap, topics["output"], 1000)
    finally:
        service.stop()
    assert 1000 <= len(partial) < len(first), "the first run should stop mid-stream"

    second = make_values(model.manifest, "json", 3000, np.random.default_rng(3))
    send(kafka_bootstrap, topics["input"], second, first_key=len(first))
    service = Service(config.replace(kafka={"max_offsets_per_trigger": 5000}))
    service.start()
    try:
        total = len(first) + len(second)
        records = _read_until_distinct(kafka_bootstrap, topics["output"], total)
    finally:
        service.stop()

    by_id: dict[str, bytes] = {}
    for record in records:
        prediction = json.loads(record.value)
        previous = by_id.setdefault(prediction["idempotency_key"], record.value)
        assert previous == record.value, "a duplicate must carry the same idempotency key and prediction"
    assert len(by_id) == total
    assert {json.loads(v)["key"] for v in by_id.values()} == {f"user-{i}" for i in range(total)}


def _read_until_distinct(kafka_bootstrap, topic, distinct):
    deadline = time.monotonic() + OUTPUT_WAIT_SECONDS
    while True:
        records = read_all(kafka_bootstrap, topic, distinct, seconds=10)
        keys = {json.loads(r.value)["idempotency_key"] for r in records}
        if len(keys) >= distinct or time.monotonic() > deadline:
            return records


def test_malformed_records_go_to_the_dead_letter_topic(kafka_bootstrap, topics, model_registry, tmp_path, spark, connector):
    model = model_registry.get("iris_like")
    good = make_values(model.manifest, "json", 3000, np.random.default_rng(4))
    values = list(good)
    bad_positions = {}
    for n, kind in enumerate(JSON_BAD_KINDS * 4):
        position = 37 + n * 61
        values[position] = corrupt(good[position], kind, model.manifest)
        bad_positions[f"user-{position}".encode()] = kind
    keys = send(kafka_bootstrap, topics["input"], values)
    service = Service(service_config(kafka_bootstrap, topics, model_registry, tmp_path, connector))
    service.start()
    try:
        dead = read_all(kafka_bootstrap, topics["dlq"], len(bad_positions))
        predictions = read_all(kafka_bootstrap, topics["output"], len(values) - len(bad_positions))
        assert service.query.isActive, "bad records must never stop the query"
    finally:
        service.stop()

    assert {r.key for r in dead} == set(bad_positions)
    assert len(predictions) == len(values) - len(bad_positions)
    assert {r.key for r in predictions} == set(keys) - set(bad_positions)
    sent = dict(zip(keys, values))
    origin = {r.key: r for r in read_all(kafka_bootstrap, topics["input"], len(values))}
    for record in dead:
        headers = dict(record.headers)
        event = origin[record.key]
        assert record.value == sent[record.key], "a dead letter keeps its original value"
        assert headers["streamhydro.origin.topic"].decode() == topics["input"]
        assert int(headers["streamhydro.origin.partition"]) == event.partition
        assert int(headers["streamhydro.origin.offset"]) == event.offset
        assert int(headers["streamhydro.origin.timestamp"]) == event.timestamp
        assert headers["streamhydro.error.class"]
        assert headers["streamhydro.error.message"]
        assert headers["trace"] == sent_trace(record.key), "the event's own headers are carried over"


def sent_trace(key: bytes) -> bytes:
    return b"t" + key.removeprefix(b"user-")


def test_wrong_tensor_lengths_go_to_the_dead_letter_topic(kafka_bootstrap, topics, model_registry, tmp_path, spark, connector):
    model = model_registry.get("iris_like")
    values = make_values(model.manifest, "tensor", 500, np.random.default_rng(5))
    for i, kind in enumerate(TENSOR_BAD_KINDS):
        values[i * 100] = corrupt(values[i * 100], kind, model.manifest)
    values[450] = values[450] + b"\x00\x00\x80\x3f"
    send(kafka_bootstrap, topics["input"], values)
    config = service_config(kafka_bootstrap, topics, model_registry, tmp_path, connector)
    service = Service(config.replace(payload={"format": "tensor"}))
    service.start()
    try:
        dead = read_all(kafka_bootstrap, topics["dlq"], 3)
        predictions = read_all(kafka_bootstrap, topics["output"], 497)
    finally:
        service.stop()
    assert sorted(r.key for r in dead) == [b"user-0", b"user-100", b"user-450"]
    assert len(predictions) == 497


def test_a_broker_that_requires_scram_serves_with_the_settings_written_once(scram_kafka, topic_name, model_registry, tmp_path, spark, connector):
    """SASL/SCRAM settings written once in librdkafka's spelling reach both connectors and every client."""
    from conftest import SCRAM_PASSWORD, SCRAM_USER

    bootstrap = scram_kafka.bootstrap_servers
    settings = {"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": SCRAM_USER, "sasl.password": SCRAM_PASSWORD}
    users_client = {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": SCRAM_USER, "sasl_plain_password": SCRAM_PASSWORD}
    names = {"input": f"{topic_name}-in", "output": f"{topic_name}-out", "dlq": f"{topic_name}-dlq"}
    ensure_topics(client(bootstrap, settings), {names["input"]: 2})
    model = model_registry.get("iris_like")
    values = make_values(model.manifest, "json", 2000, np.random.default_rng(6))
    send(bootstrap, names["input"], values, **users_client)
    config = service_config(bootstrap, names, model_registry, tmp_path, connector, client=settings)
    service = Service(config)
    service.start()
    try:
        records = read_all(bootstrap, names["output"], len(values), **users_client)
    finally:
        service.stop()
    assert len({json.loads(r.value)["idempotency_key"] for r in records}) == len(values)
