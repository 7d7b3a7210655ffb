"""Shared fixtures. Nothing here starts Spark or a broker at import time: fixtures do, once a session."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

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
    from streamhydro.kafka import clients

    external = os.environ.get(BOOTSTRAP_ENV)
    if external:
        yield external
        clients.close_all()
        return
    if _docker_reachable():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer() as container:
            yield container.get_bootstrap_server()
            clients.close_all()
        return
    from streamhydro.broker import EmbeddedBroker

    with EmbeddedBroker() as broker:
        yield broker.bootstrap_servers
        clients.close_all()


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


@pytest.fixture(scope="session")
def model_registry(tmp_path_factory):
    """A registry with one model, ``iris_like`` version 1: four named features, three labels."""
    import dataclasses

    from _inference_models import softmax_model
    from streamhydro.registry import Registry, TensorSpec

    root = tmp_path_factory.mktemp("registry")
    registry = Registry(root)
    features = ("sepal_length", "sepal_width", "petal_length", "petal_width")
    labels = ("setosa", "versicolor", "virginica")
    model, manifest = softmax_model([TensorSpec("features", "float32", (-1, len(features)), features)], labels)
    registry.publish(dataclasses.replace(manifest, name="iris_like", description="test model: softmax over random weights"), model)
    return registry


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url: str) -> str:
    """The body of an HTTP GET, as text."""
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


@pytest.fixture
def pushgateway(tmp_path) -> Iterator[str]:
    """A real Pushgateway (Debian's prometheus-pushgateway) on a free loopback port; stopped afterwards."""
    binary = shutil.which("prometheus-pushgateway") or shutil.which("pushgateway")
    if binary is None:
        pytest.fail("prometheus-pushgateway not found: apt-get install prometheus-pushgateway")
    address = f"127.0.0.1:{free_port()}"
    log = (tmp_path / "pushgateway.log").open("w")
    process = subprocess.Popen([binary, f"--web.listen-address={address}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                get(f"http://{address}/-/ready")
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    pytest.fail(f"pushgateway did not start: {(tmp_path / 'pushgateway.log').read_text()}")
                time.sleep(0.1)
        yield address
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


def samples(text: str) -> list:
    """Every sample of a Prometheus text exposition."""
    return [s for f in text_string_to_metric_families(text) for s in f.samples]
