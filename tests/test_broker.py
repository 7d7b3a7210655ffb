"""The local brokers: start on free ports, answer Kafka clients, stop, restart with their data, leave no process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
from confluent_kafka.admin import AdminClient
from kafka import KafkaConsumer, KafkaProducer

from conftest import client
from streamhydro.brokers import ApacheKafkaBroker, BrokerConfig, TansuBroker
from streamhydro.errors import BrokerError
from streamhydro.kafka.admin import ensure_topics

pytestmark = pytest.mark.broker


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split()[2] != "Z"


def test_starts_answers_and_stops(tmp_path):
    with TansuBroker(BrokerConfig(log_dir=str(tmp_path))) as broker:
        host, port = broker.bootstrap_servers.split(":")
        assert host == "127.0.0.1" and int(port) > 0
        pid = broker.pid
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers)
        producer.send("hello", b"world").get(timeout=10)
        producer.close()
        consumer = KafkaConsumer(
            "hello", bootstrap_servers=broker.bootstrap_servers, auto_offset_reset="earliest", consumer_timeout_ms=10000
        )
        assert next(consumer).value == b"world"
        consumer.close()
        started = time.monotonic()
    assert time.monotonic() - started < 3, "stop must not wait for Tansu's SIGTERM grace period"
    assert not _alive(pid)
    assert not broker.running()
    assert broker.log_path.parent == tmp_path and broker.log_path.read_text()
    with pytest.raises(BrokerError, match="not running"):
        _ = broker.bootstrap_servers


def test_two_brokers_get_different_ports():
    with TansuBroker() as first, TansuBroker() as second:
        assert first.bootstrap_servers != second.bootstrap_servers


def test_broker_dies_with_its_parent(tmp_path):
    """A parent killed with SIGKILL runs no Python exit hook; PR_SET_PDEATHSIG still ends the broker."""
    script = textwrap.dedent(
        """
        import sys, time
        from streamhydro.brokers import TansuBroker
        broker = TansuBroker().start()
        print(broker.pid, flush=True)
        time.sleep(60)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(parent.stdout.readline())
        assert _alive(pid)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 5
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)


def test_broker_stopped_at_interpreter_exit():
    script = "from streamhydro.brokers import TansuBroker; print(TansuBroker().start().pid)"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert not _alive(int(done.stdout.strip()))


def test_start_failure_is_a_broker_error_with_the_log(tmp_path, monkeypatch):
    fake = tmp_path / "tansu"
    fake.write_text("#!/bin/sh\necho 'cannot bind: simulated failure' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CALF_TANSU_BIN", str(fake))
    with pytest.raises(BrokerError, match="simulated failure"):
        TansuBroker(BrokerConfig(start_timeout_s=2, port_attempts=1, log_dir=str(tmp_path))).start()


def test_ensure_topics_creates_missing_topics_idempotently(kafka_bootstrap, topic_name):
    ensure_topics(client(kafka_bootstrap), {topic_name: 3})
    ensure_topics(client(kafka_bootstrap), {topic_name: 3, f"{topic_name}-other": 1})
    topics = AdminClient({"bootstrap.servers": kafka_bootstrap}).list_topics(timeout=10).topics
    assert len(topics[topic_name].partitions) == 3
    assert len(topics[f"{topic_name}-other"].partitions) == 1


def test_apache_kafka_keeps_what_it_acknowledged_across_a_crash(tmp_path):
    """SIGKILL, then start again on the same ports and data: every acknowledged record is still there."""
    with ApacheKafkaBroker(data_dir=tmp_path / "kafka") as broker:
        bootstrap = broker.bootstrap_servers
        ensure_topics(client(bootstrap), {"kept": 1})
        producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
        for i in range(100):
            producer.send("kept", f"r{i}".encode())
        producer.flush(30)
        producer.close()
        pid = broker.pid
        broker.kill()
        assert not _alive(pid)
        broker.start()
        assert broker.bootstrap_servers == bootstrap
        consumer = KafkaConsumer(
            "kept", bootstrap_servers=bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=10000
        )
        assert [r.value for r in consumer][:100] == [f"r{i}".encode() for i in range(100)]
        consumer.close()
        pid = broker.pid
    assert not _alive(pid)
    assert (tmp_path / "kafka").exists(), "a data_dir the caller gave is kept"


def test_scram_broker_refuses_a_wrong_password_and_admits_the_right_one(scram_kafka):
    from confluent_kafka import KafkaException

    good = client(scram_kafka.bootstrap_servers, scram_kafka.client_settings)
    ensure_topics(good, {"scram-topic": 1})
    wrong = client(scram_kafka.bootstrap_servers, {**scram_kafka.client_settings, "sasl.password": "wrong"})
    admin = AdminClient(wrong.as_dict())
    with pytest.raises(KafkaException):
        admin.list_topics(timeout=5)


def test_cluster_ids_never_start_with_a_dash(monkeypatch):
    """The storage tool reads an id starting with "-" as an option and refuses to format (seen 1 run in 64)."""
    from streamhydro.brokers import apache

    draws = iter([bytes([0xF8]) + bytes(15), bytes(16)])
    monkeypatch.setattr(apache.uuid, "uuid4", lambda: type("U", (), {"bytes": next(draws)})())
    assert apache.new_cluster_id() == "A" * 22
