"""Shared fixtures. Nothing here starts Spark or a broker at import time: fixtures do, once a session."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

BOOTSTRAP_ENV = "STREAMHYDRO_TEST_BOOTSTRAP"


def _docker_reachable() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
    except Exception:  # noqa: BLE001 -- any failure means "no usable engine"
        return False
    return True


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """A Kafka-protocol broker for the session.

    Prefers an external Kafka named by $STREAMHYDRO_TEST_BOOTSTRAP, then an Apache Kafka container
    (testcontainers) when a Docker engine answers, then the embedded Tansu broker.
    """
    external = os.environ.get(BOOTSTRAP_ENV)
    if external:
        yield external
        return
    if _docker_reachable():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer() as container:
            yield container.get_bootstrap_server()
        return
    from streamhydro.broker import EmbeddedBroker

    with EmbeddedBroker() as broker:
        yield broker.bootstrap_servers


@pytest.fixture
def topic_name() -> str:
    """A fresh topic name per test, so tests sharing a broker never see each other's records."""
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def spark():
    """One local[2] SparkSession for the whole test session, with streamhydro's data source registered."""
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from streamhydro.driver.session import build_session

    session = build_session(master="local[2]", app_name="streamhydro-tests", conf={"spark.ui.enabled": "false"})
    yield session
    session.stop()


def build_softmax_model(n_features: int, labels: tuple[str, ...], seed: int = 0) -> bytes:
    """A small real classifier as ONNX: softmax(x @ W + b), weights drawn from ``seed``."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weights = numpy_helper.from_array(rng.normal(size=(n_features, len(labels))).astype(np.float32), "W")
    bias = numpy_helper.from_array(rng.normal(size=(len(labels),)).astype(np.float32), "b")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["features", "W"], ["logits0"]),
            helper.make_node("Add", ["logits0", "b"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        "softmax_classifier",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", n_features])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", len(labels)])],
        initializer=[weights, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


@pytest.fixture(scope="session")
def model_registry(tmp_path_factory):
    """A registry with one model, ``iris_like`` version 1: four named features, three labels."""
    from streamhydro.registry import Manifest, Registry, TensorSpec

    root = tmp_path_factory.mktemp("registry")
    registry = Registry(root)
    features = ("sepal_length", "sepal_width", "petal_length", "petal_width")
    labels = ("setosa", "versicolor", "virginica")
    manifest = Manifest(
        name="iris_like",
        version=1,
        sha256="",
        inputs=(TensorSpec("features", "float32", (-1, len(features)), features),),
        outputs=(TensorSpec("probabilities", "float32", (-1, len(labels))),),
        labels=labels,
        created="2026-11-24T00:00:00Z",
        description="test model: softmax over random weights",
    )
    registry.publish(manifest, build_softmax_model(len(features), labels))
    return registry
