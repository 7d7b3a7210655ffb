"""Exactly-once delivery on Apache Kafka: real Spark, the real broker, output read with read_committed.

Faults: a task that fails with its transaction open and is retried; a kill -9 of the service
between its transactions' commit and Spark's commit of the micro-batch, then a restart from the
checkpoint. Refusals at start: Spark's built-in sink, speculation, Tansu (transactions not isolated).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from confluent_kafka import Consumer, TopicPartition

from conftest import client, read_all, send
from streamhydro.config import Config
from streamhydro.driver.serve import SPECULATION, Service
from streamhydro.errors import ConfigError
from streamhydro.kafka.admin import ensure_topics
from streamhydro.kafka.clients import build_client
from streamhydro.kafka.options import parse_sink_options
from streamhydro.kafka.planning import OffsetRange
from streamhydro.kafka.transactions import MarkMismatch, check_transactions, produce_exactly_once
from streamhydro.producer import make_values

REPO = Path(__file__).parent.parent
FAULTS = Path(__file__).parent / "_serve_with_fault.py"
COMMITTED = {"isolation_level": "read_committed"}
RUN_SECONDS = 300


@pytest.fixture
def topics(kafka_bootstrap, topic_name):
    names = {"input": f"{topic_name}-in", "output": f"{topic_name}-out", "dlq": f"{topic_name}-dlq"}
    ensure_topics(client(kafka_bootstrap), {names["input"]: 2, names["output"]: 2, names["dlq"]: 1})
    return names


def service_config(kafka_bootstrap, topics, model_registry, tmp_path, **kafka) -> Config:
    return Config().replace(
        spark={"master": "local[2]", "checkpoint_location": str(tmp_path / "checkpoint")},
        kafka={
            "bootstrap_servers": kafka_bootstrap,
            "subscribe": topics["input"],
            "output_topic": topics["output"],
            "dead_letter_topic": topics["dlq"],
            "source": "python",
            "delivery": "exactly_once",
            **kafka,
        },
        model={"registry": str(model_registry.root), "name": "iris_like", "version": "latest"},
        inference={"providers": ["CPUExecutionProvider"], "batch_size": 500, "pipeline_depth": 0},
        metrics={"enabled": False},
    )


def test_config_refuses_exactly_once_with_the_builtin_connector():
    with pytest.raises(ConfigError) as refused:
        Config().replace(kafka={"delivery": "exactly_once", "source": "builtin"})
    assert refused.value.key == "kafka.delivery" and 'source = "python"' in refused.value.fix
    with pytest.raises(ConfigError) as chosen:
        Config().replace(kafka={"client": {"transactional.id": "mine"}})
    assert chosen.value.key == "kafka.client.transactional.id"
    with pytest.raises(ConfigError) as unknown:
        Config().replace(kafka={"delivery": "exactly-once"})
    assert unknown.value.key == "kafka.delivery"
    assert Config().replace(kafka={"delivery": "exactly_once", "source": "python"}).kafka.delivery == "exactly_once"


def test_the_sink_refuses_transactions_and_points_to_serve():
    for option in ({"kafka.transactional.id": "mine"}, {"delivery": "exactly_once"}):
        with pytest.raises(ConfigError) as refused:
            parse_sink_options({"kafka.bootstrap.servers": "b:9092", **option})
        assert refused.value.key == next(iter(option)) and "kafka.delivery" in refused.value.fix


@pytest.mark.broker
def test_the_transaction_probe_accepts_apache_kafka_and_refuses_tansu(kafka_bootstrap, tansu_bootstrap):
    check_transactions(client(kafka_bootstrap))
    with pytest.raises(ConfigError) as refused:
        check_transactions(client(tansu_bootstrap))
    assert refused.value.key == "kafka.delivery"
    assert "does not isolate transactions" in refused.value.problem and "the aborted record among them" in refused.value.problem


@pytest.mark.spark
@pytest.mark.broker
def test_start_refuses_speculation(kafka_bootstrap, topics, model_registry, tmp_path, spark):
    live_conf = spark.sparkContext._jsc.sc().conf()
    live_conf.set(SPECULATION, "true")
    speculative = Service(service_config(kafka_bootstrap, topics, model_registry, tmp_path))
    try:
        with pytest.raises(ConfigError) as refused:
            speculative.start()
    finally:
        live_conf.set(SPECULATION, "false")
        speculative.close()
    assert refused.value.key == f"spark.conf.{SPECULATION}"


def _results(output: str, source: str, partition: int, count: int, fail_after: int | None = None):
    """Sink rows for offsets 0..count-1 of ``source[partition]``, in batches of 100; raises after ``fail_after`` rows."""
    for start in range(0, count, 100):
        if fail_after is not None and start >= fail_after:
            raise RuntimeError("injected: the scoring failed")
        values = [f"{source}-{partition}-{o}".encode() for o in range(start, min(start + 100, count))]
        yield pa.RecordBatch.from_pydict({"value": values, "topic": [output] * len(values)})


def _log_end(kafka_bootstrap, topic: str) -> int:
    consumer = build_client(Consumer, client(kafka_bootstrap, {"group.id": "log-end"}))
    try:
        partitions = consumer.list_topics(topic, timeout=30).topics[topic].partitions
        return sum(consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30)[1] for p in partitions)
    finally:
        consumer.close()


def _committed(kafka_bootstrap, group: str, topic: str) -> list:
    marks = build_client(Consumer, client(kafka_bootstrap, {"group.id": group, "isolation.level": "read_committed"}))
    try:
        return marks.committed([TopicPartition(topic, 0), TopicPartition(topic, 1)], timeout=30)
    finally:
        marks.close()


@pytest.mark.broker
def test_a_range_is_written_once_and_recorded_in_the_same_transaction(kafka_bootstrap, topic_name):
    output, source = f"{topic_name}-out", f"{topic_name}-src"
    ensure_topics(client(kafka_bootstrap), {output: 2, source: 2})
    prefix = f"test-{topic_name}"
    ranges = [OffsetRange(source, p, 0, 300) for p in (0, 1)]

    def write(prefix: str, fail_after: int | None = None) -> list[int]:
        return [produce_exactly_once(client(kafka_bootstrap), r, _results(output, source, r.partition, 300, fail_after), prefix) for r in ranges]

    assert write(prefix) == [300, 300]
    written = read_all(kafka_bootstrap, output, 600, **COMMITTED)
    assert sorted(r.value for r in written) == sorted(f"{source}-{p}-{o}".encode() for p in (0, 1) for o in range(300))
    committed = _committed(kafka_bootstrap, prefix, source)
    assert [tp.offset for tp in committed] == [300, 300] and json.loads(committed[0].metadata) == {"query": prefix, "batch": None, "from": 0, "until": 300}
    log_end = _log_end(kafka_bootstrap, output)

    assert write(prefix) == [0, 0]
    assert _log_end(kafka_bootstrap, output) == log_end, "a range already written must not be written again, not even aborted"

    assert write(f"{prefix}-other") == [300, 300]
    assert len(read_all(kafka_bootstrap, output, 1200, **COMMITTED)) == 1200, "another query writes its own"

    with pytest.raises(RuntimeError, match="injected"):
        write(f"{prefix}-cut", fail_after=200)
    assert _log_end(kafka_bootstrap, output) > log_end + 600, "the failed attempt's records lie in the log"
    assert len(read_all(kafka_bootstrap, output, 1201, seconds=5, **COMMITTED)) == 1200, "aborted, invisible"
    assert [tp.offset for tp in _committed(kafka_bootstrap, f"{prefix}-cut", source)] == [-1001, -1001]

    # An operator resets the group to latest: the next range is not taken as written, the task fails naming the group.
    marks = build_client(Consumer, client(kafka_bootstrap, {"group.id": prefix, "isolation.level": "read_committed"}))
    marks.commit(offsets=[TopicPartition(source, 0, 900)], asynchronous=False)
    marks.close()
    with pytest.raises(MarkMismatch, match=rf"consumer group {prefix} marks {source}\[0\] written up to offset 900"):
        produce_exactly_once(client(kafka_bootstrap), OffsetRange(source, 0, 300, 600), _results(output, source, 0, 300, None), prefix)


def _serve(tmp_path: Path, toml: str, name: str, fault: tuple[str, str] | None = None) -> tuple[subprocess.Popen, Path]:
    """``streamhydro serve --config FILE`` as users run it, in its own process (with ``fault``: through the fault launcher)."""
    path = tmp_path / "serve.toml"
    path.write_text(toml)
    log = tmp_path / f"{name}.log"
    entry = [str(FAULTS), *fault] if fault else ["-m", "streamhydro"]
    environment = {**os.environ, "PYTHONPATH": str(REPO), "SPARK_LOCAL_IP": "127.0.0.1"}
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, *entry, "serve", "--config", str(path)], stdout=out, stderr=subprocess.STDOUT, env=environment, cwd=REPO
        )
    return process, log


def _toml(kafka_bootstrap, topics, model_registry, tmp_path, master: str, max_offsets: int, spark_conf: dict[str, str]) -> str:
    conf = ", ".join(f'"{key}" = "{value}"' for key, value in {"spark.ui.enabled": "false", **spark_conf}.items())
    return f"""[spark]
master = "{master}"
checkpoint_location = "{tmp_path / 'checkpoint'}"
conf = {{ {conf} }}

[kafka]
bootstrap_servers = "{kafka_bootstrap}"
subscribe = "{topics['input']}"
output_topic = "{topics['output']}"
dead_letter_topic = "{topics['dlq']}"
source = "python"
delivery = "exactly_once"
max_offsets_per_trigger = {max_offsets}

[model]
registry = "{model_registry.root}"
name = "iris_like"
version = "latest"

[inference]
providers = ["CPUExecutionProvider"]
batch_size = 500
pipeline_depth = 0

[metrics]
enabled = false
"""


def _stop(process: subprocess.Popen, log: Path) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        assert process.wait(timeout=120) == 0, log.read_text()[-5000:]
    finally:
        if process.poll() is None:
            process.kill()


def _exactly_once(kafka_bootstrap, topics, events: int) -> list:
    """The output as read_committed consumers see it, checked to hold one prediction per event."""
    records = read_all(kafka_bootstrap, topics["output"], events, seconds=RUN_SECONDS, **COMMITTED)
    keys = [json.loads(r.value)["idempotency_key"] for r in records]
    assert len(set(keys)) == events, f"{events - len(set(keys))} events lost"
    assert len(keys) == events, f"{len(keys) - events} duplicates"
    assert read_all(kafka_bootstrap, topics["dlq"], 1, seconds=2, **COMMITTED) == []
    return records


@pytest.mark.spark
@pytest.mark.broker
@pytest.mark.slow
def test_a_task_failing_with_its_transaction_open_is_retried_and_written_once(kafka_bootstrap, topic_name, model_registry, tmp_path):
    topics = {"input": f"{topic_name}-in", "output": f"{topic_name}-out", "dlq": f"{topic_name}-dlq"}
    ensure_topics(client(kafka_bootstrap), {topics["input"]: 1, topics["output"]: 2, topics["dlq"]: 1})
    events = 3000
    send(kafka_bootstrap, topics["input"], make_values(model_registry.get("iris_like").manifest, "json", events, np.random.default_rng(4)))
    # Scored in batches of 500 (inference.batch_size), so the task fails after writing its third batch of 1500.
    toml = _toml(kafka_bootstrap, topics, model_registry, tmp_path, "local[2,2]", 1500, {})
    flag = tmp_path / "fault-claimed"
    process, log = _serve(tmp_path, toml, "serve", fault=("fail-mid-write", str(flag)))
    try:
        _exactly_once(kafka_bootstrap, topics, events)
    finally:
        _stop(process, log)
    assert flag.exists(), "the fault was never injected"
    in_log = read_all(kafka_bootstrap, topics["output"], events + 1, seconds=10)
    assert len(in_log) > events, "the failed attempt's records should lie in the log, aborted"


@pytest.mark.spark
@pytest.mark.broker
@pytest.mark.slow
def test_kill_between_the_transactions_commit_and_the_batch_commit_then_restart(kafka_bootstrap, topics, model_registry, tmp_path):
    events = 4000
    send(kafka_bootstrap, topics["input"], make_values(model_registry.get("iris_like").manifest, "json", events, np.random.default_rng(5)))
    toml = _toml(kafka_bootstrap, topics, model_registry, tmp_path, "local[2]", 1000, {})
    killed, log = _serve(tmp_path, toml, "killed", fault=("kill-after-write", "1"))
    try:
        assert killed.wait(timeout=RUN_SECONDS) == -signal.SIGKILL, log.read_text()[-5000:]
    finally:
        if killed.poll() is None:
            killed.kill()
    checkpoint = tmp_path / "checkpoint"
    assert (checkpoint / "offsets" / "1").exists() and not (checkpoint / "commits" / "1").exists(), "killed elsewhere"
    before_restart = len(read_all(kafka_bootstrap, topics["output"], 2000, seconds=30, **COMMITTED))
    assert before_restart == 2000, "batches 0 and 1 (1000 events each) were committed in Kafka before the kill"

    process, log = _serve(tmp_path, toml, "restarted")
    try:
        _exactly_once(kafka_bootstrap, topics, events)
    finally:
        _stop(process, log)
    in_log = read_all(kafka_bootstrap, topics["output"], events + 1, seconds=10)
    assert len(in_log) == events, "the replayed batch 1 must write nothing, not even records it then aborts"
