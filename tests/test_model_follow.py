"""Serving follows the registry: new versions at micro-batch boundaries, bad versions refused."""

from __future__ import annotations

import dataclasses
import json
import threading
import time

import pytest

from _inference_models import feature_spec, softmax_model
from conftest import client
from streamhydro.config import Config
from streamhydro.driver.models import ModelFollower
from streamhydro.driver.serve import Service
from streamhydro.errors import ModelError
from streamhydro.kafka.admin import ensure_topics
from streamhydro.producer import LoadGenerator
from streamhydro.registry import MODEL_FILE, Registry

pytestmark = [pytest.mark.spark]


@pytest.fixture
def registry(model_registry, tmp_path):
    """A private copy of the test registry, so a test can publish without affecting others."""
    fresh = Registry(tmp_path / "models")
    original = model_registry.get("iris_like")
    fresh.publish(original.manifest, original.path.read_bytes())
    return fresh


def publish_next(registry: Registry, seed: int) -> int:
    manifest = registry.get("iris_like").manifest
    model, _ = softmax_model(manifest.inputs, manifest.labels, seed=seed)
    return registry.publish(dataclasses.replace(manifest, version=0), model).manifest.version


def corrupt_next(registry: Registry) -> int:
    version = publish_next(registry, seed=99)
    (registry.root / "iris_like" / str(version) / MODEL_FILE).write_bytes(b"not an onnx model")
    return version


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def follower_config(registry: Registry, payload: str = "json", **model) -> Config:
    return Config().replace(
        model={"registry": str(registry.root), "name": "iris_like", "version": "latest", "refresh_seconds": 5, **model},
        payload={"format": payload},
    )


def test_follower_switches_at_refresh_and_refuses_bad_versions(spark, registry):
    clock = Clock()
    switched, refused = [], []
    follower = ModelFollower(
        spark, follower_config(registry), on_switch=lambda v: switched.append(v.manifest.version),
        on_refuse=lambda name, version, reason: refused.append((version, reason)), clock=clock,
    )
    try:
        assert follower.plan.manifest.version == 1
        publish_next(registry, seed=1)
        assert follower.plan.manifest.version == 1, "no registry check before refresh_seconds"
        clock.now = 5
        assert follower.plan.manifest.version == 2
        bad = corrupt_next(registry)
        clock.now = 10
        assert follower.plan.manifest.version == 2, "a corrupt model must not replace the one serving"
        assert refused and refused[0][0] == bad and "checksum" in refused[0][1]
        clock.now = 15
        follower.plan  # noqa: B018 -- a refused version is not retried on every check
        assert len(refused) == 1
        assert switched == [1, 2]
    finally:
        follower.close()


def test_pinned_version_is_kept(spark, registry):
    clock = Clock()
    publish_next(registry, seed=1)
    follower = ModelFollower(spark, follower_config(registry, version="1"), clock=clock)
    try:
        clock.now = 100
        assert follower.plan.manifest.version == 1
    finally:
        follower.close()


def test_a_model_that_does_not_fit_the_payload_is_refused_at_start(spark, registry):
    data, two_inputs = softmax_model([feature_spec("a", 2), feature_spec("b", 2)], registry.get("iris_like").manifest.labels)
    registry.publish(dataclasses.replace(two_inputs, name="iris_like", version=0), data)
    with pytest.raises(ModelError, match="feeds exactly one input"):
        ModelFollower(spark, follower_config(registry, payload="tensor"))


@pytest.mark.broker
@pytest.mark.slow
def test_serve_switches_versions_mid_stream_without_losing_events(spark, registry, kafka_bootstrap, topic_name, tmp_path):
    topics = {"in": f"{topic_name}-in", "out": f"{topic_name}-out", "dlq": f"{topic_name}-dlq"}
    ensure_topics(client(kafka_bootstrap), {topics["in"]: 2, topics["out"]: 2, topics["dlq"]: 1})
    config = Config().replace(
        spark={"checkpoint_location": str(tmp_path / "checkpoint")},
        kafka={"bootstrap_servers": kafka_bootstrap, "subscribe": topics["in"], "output_topic": topics["out"],
               "dead_letter_topic": topics["dlq"], "source": "python", "max_offsets_per_trigger": 300},
        model={"registry": str(registry.root), "name": "iris_like", "version": "latest", "refresh_seconds": 0.5},
        inference={"providers": ["CPUExecutionProvider"]},
        metrics={"enabled": False},
    )
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": topic_name, "enable.auto.commit": False})
    consumer.assign([TopicPartition(topics["out"], p, OFFSET_BEGINNING) for p in (0, 1)])
    predictions: list[dict] = []

    def read_until(condition, seconds=180) -> None:
        deadline = time.monotonic() + seconds
        while not condition() and time.monotonic() < deadline:
            predictions.extend(json.loads(m.value()) for m in consumer.consume(10_000, timeout=0.5) if m.error() is None)

    manifest = registry.get("iris_like").manifest
    stop = threading.Event()
    generator = LoadGenerator(client(kafka_bootstrap), topics["in"], manifest)
    total = 6000
    service = Service(config)
    service.start()
    producing = threading.Thread(target=generator.run, args=(total, 1000.0, stop))
    producing.start()
    try:
        read_until(lambda: len(predictions) >= 1000)
        v2 = publish_next(registry, seed=2)
        read_until(lambda: any(p["model"]["version"] == v2 for p in predictions))
        bad = corrupt_next(registry)
        read_until(lambda: len({p["idempotency_key"] for p in predictions}) >= total)
        producing.join()
    finally:
        stop.set()
        service.stop()
        consumer.close()

    versions = [p["model"]["version"] for p in predictions]
    assert set(versions) == {1, v2}, f"the corrupt version {bad} must never score"
    assert len({p["idempotency_key"] for p in predictions}) == total
    assert bad in service.follower.refused
    for partition in (0, 1):
        in_order = [p["model"]["version"] for p in sorted(predictions, key=lambda p: p["source"]["offset"]) if p["source"]["partition"] == partition]
        assert in_order == sorted(in_order), "a partition moves to the new version once, at a batch boundary"
