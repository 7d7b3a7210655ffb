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
from typing import TYPE_CHECKING

import pytest
from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:
    from streamhydro.brokers import ApacheKafkaBroker

BOOTSTRAP_ENV = "STREAMHYDRO_TEST_BOOTSTRAP"
SCHEMA_REGISTRY_ENV = "STREAMHYDRO_TEST_SCHEMA_REGISTRY"
SCRAM_USER = "scorer"
SCRAM_PASSWORD = "scram-Secret-4711"


def _docker_reachable() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
    except Exception:  # noqa: BLE001 -- any failure means "no usable engine"
        return False
    return True


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """An Apache Kafka broker for the whole test session (tests keep apart by topic name).

    In order of preference: an external cluster named by $STREAMHYDRO_TEST_BOOTSTRAP, an Apache Kafka
    container (testcontainers) where a Docker engine answers, else Apache Kafka from the jar cache
    (:class:`~streamhydro.brokers.ApacheKafkaBroker`, resolved from Maven Central on first use).
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
    from streamhydro.brokers import ApacheKafkaBroker

    with ApacheKafkaBroker() as broker:
        yield broker.bootstrap_servers
        clients.close_all()


@pytest.fixture(scope="session")
def schema_registry_url() -> Iterator[str]:
    """The base URL of a schema registry with the Confluent REST API, for the whole test session (tests
    keep apart by subject name).

    An external registry named by $STREAMHYDRO_TEST_SCHEMA_REGISTRY (its base URL, as clients take it),
    else Apicurio Registry from the jar cache (:class:`~streamhydro.brokers.SchemaRegistryServer`, built
    from Maven Central on first use).
    """
    external = os.environ.get(SCHEMA_REGISTRY_ENV)
    if external:
        yield external
        return
    from streamhydro.brokers import SchemaRegistryServer

    with SchemaRegistryServer() as registry:
        yield registry.url


@pytest.fixture(scope="session")
def tansu_bootstrap() -> Iterator[str]:
    """The Tansu broker, for the tests about Tansu and the workarounds for its defects."""
    from streamhydro.brokers import TansuBroker
    from streamhydro.kafka import clients

    with TansuBroker() as broker:
        yield broker.bootstrap_servers
        clients.close_all()


@pytest.fixture(scope="module")
def scram_kafka() -> Iterator[ApacheKafkaBroker]:
    """An Apache Kafka broker whose client listener requires SASL/SCRAM (user ``scorer``)."""
    from streamhydro.brokers import ApacheKafkaBroker
    from streamhydro.kafka import clients

    with ApacheKafkaBroker(scram_users={SCRAM_USER: SCRAM_PASSWORD}) as broker:
        yield broker
        clients.close_all()


def client(bootstrap: str, settings: dict[str, str] | None = None):
    """librdkafka settings for streamhydro's own clients of ``bootstrap`` (the project's one path)."""
    from streamhydro.kafka.options import client_for

    return client_for(bootstrap, settings)


@pytest.fixture
def topic_name() -> str:
    """A fresh topic name per test, so tests sharing a broker never see each other's records."""
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def spark():
    """One local[2] SparkSession for the whole test session, with streamhydro's data source registered
    and Spark's own Kafka connector on the classpath (from the jar cache), as users run it."""
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from streamhydro.driver.connectors.builtin import connector_conf
    from streamhydro.spark import Master, streaming_session

    conf = {"spark.ui.enabled": "false", **connector_conf({})}
    session = streaming_session(Master.parse("local[2]"), "streamhydro-tests", conf)
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


def send(bootstrap: str, topic: str, values: list[bytes], first_key: int = 0, **client) -> list[bytes]:
    """Produce with kafka-python, the users' own client: keys ``user-<n>``, a ``trace`` header. Returns the keys.

    ``client``: more kafka-python settings (security...)."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks="all", **client)
    keys = []
    for i, value in enumerate(values, start=first_key):
        key = f"user-{i}".encode()
        producer.send(topic, key=key, value=value, headers=[("trace", f"t{i}".encode())])
        keys.append(key)
    producer.flush(60)
    producer.close()
    return keys


def read_all(bootstrap: str, topic: str, expected: int, seconds: float = 240, **client) -> list:
    """Read ``topic`` from the beginning with kafka-python until ``expected`` records or time runs out.

    One more short poll after ``expected`` arrived returns any surplus, so callers can assert exact counts.
    ``client``: more kafka-python settings (security...).
    """
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, consumer_timeout_ms=1000, **client)
    partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    records: list = []
    deadline = time.monotonic() + seconds
    while len(records) < expected and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=500, max_records=50_000).values():
            records.extend(batch)
    for batch in consumer.poll(timeout_ms=200).values():
        records.extend(batch)
    consumer.close()
    return records
