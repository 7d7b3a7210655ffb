"""Exactly-once delivery on Apache Kafka: real Spark, the real broker, output read with read_committed.

Faults: a task that fails with its transaction open and is retried; a kill -9 of the service
between its transactions' commit and Spark's commit of the micro-batch, then a restart from the
checkpoint. Refusals at start: Spark's built-in sink, speculation, Tansu (transactions not isolated).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from conftest import client, read_all, send
from streamhydro.config import Config
from streamhydro.driver.connectors.python import SPECULATION
from streamhydro.driver.serve import Service
from streamhydro.errors import ConfigError
from streamhydro.kafka.admin import ensure_topics
from streamhydro.kafka.clients import build_client
from streamhydro.kafka.planning import OffsetRange
from streamhydro.kafka.marks import History, check_marks
from streamhydro.kafka.transactions import (
    MarkMismatch, check_transactions, mark_metadata, marks_config, produce_exactly_once, transactional_config, transactional_id,
)
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


def _reader(source: str, partition: int, fail_at: int | None = None, asked: list | None = None):
    """A task's ``read``: input batches of 100 offsets of ``source[partition]`` (an ``offset`` and a
    ``value`` column); raises on reaching ``fail_at``; notes each part it is asked for in ``asked``."""

    def read(part: OffsetRange):
        if asked is not None:
            asked.append(part)
        for start in range(part.from_offset, part.until_offset, 100):
            if fail_at is not None and start >= fail_at:
                raise RuntimeError("injected: the read failed")
            offsets = list(range(start, min(start + 100, part.until_offset)))
            yield pa.RecordBatch.from_pydict({"offset": offsets, "value": [f"{source}-{partition}-{o}".encode() for o in offsets]})

    return read


def _scorer(output: str, fail_at: int | None = None, seconds_per_batch: float = 0.0):
    """A task's ``score``: one result row per input row; raises once, after yielding the batch holding ``fail_at``."""
    failures = [fail_at] if fail_at is not None else []

    def score(batches):
        for batch in batches:
            time.sleep(seconds_per_batch)
            yield pa.RecordBatch.from_pydict({"value": batch.column("value"), "topic": [output] * batch.num_rows})
            offsets = batch.column("offset").to_pylist()
            if failures and failures[0] in offsets:
                failures.clear()
                raise RuntimeError("injected: the scoring failed")

    return score


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

    def write(prefix: str, fail_at: int | None = None) -> list[int]:
        return [
            produce_exactly_once(client(kafka_bootstrap), r, _reader(source, r.partition, fail_at), _scorer(output), prefix) for r in ranges
        ]

    assert write(prefix) == [300, 300]
    written = read_all(kafka_bootstrap, output, 600, **COMMITTED)
    assert sorted(r.value for r in written) == sorted(f"{source}-{p}-{o}".encode() for p in (0, 1) for o in range(300))
    committed = _committed(kafka_bootstrap, prefix, source)
    assert [tp.offset for tp in committed] == [300, 300] and json.loads(committed[0].metadata) == {
        "query": prefix, "batch": None, "from": 0, "until": 300, "end": 300
    }
    log_end = _log_end(kafka_bootstrap, output)

    assert write(prefix) == [0, 0]
    assert _log_end(kafka_bootstrap, output) == log_end, "a range already written must not be written again, not even aborted"

    assert write(f"{prefix}-other") == [300, 300]
    assert len(read_all(kafka_bootstrap, output, 1200, **COMMITTED)) == 1200, "another query writes its own"

    with pytest.raises(RuntimeError, match="injected"):
        write(f"{prefix}-cut", fail_at=200)
    assert _log_end(kafka_bootstrap, output) > log_end + 600, "the failed attempt's records lie in the log"
    assert len(read_all(kafka_bootstrap, output, 1201, seconds=5, **COMMITTED)) == 1200, "aborted, invisible"
    assert [tp.offset for tp in _committed(kafka_bootstrap, f"{prefix}-cut", source)] == [-1001, -1001]

    # An operator resets the group to latest: the next range is not taken as written, the task fails naming the group.
    marks = build_client(Consumer, client(kafka_bootstrap, {"group.id": prefix, "isolation.level": "read_committed"}))
    marks.commit(offsets=[TopicPartition(source, 0, 900)], asynchronous=False)
    marks.close()
    with pytest.raises(MarkMismatch, match=rf"consumer group {prefix} marks {source}\[0\] written up to offset 900"):
        produce_exactly_once(client(kafka_bootstrap), OffsetRange(source, 0, 300, 600), _reader(source, 0), _scorer(output), prefix)


def _one_each(kafka_bootstrap, output: str, source: str, offsets: range) -> None:
    """The output, read read_committed, holds exactly one record per input offset."""
    written = read_all(kafka_bootstrap, output, len(offsets), seconds=60, **COMMITTED)
    assert sorted(r.value for r in written) == sorted(f"{source}-0-{o}".encode() for o in offsets)


@pytest.mark.broker
def test_a_retry_resumes_at_the_last_committed_transaction(kafka_bootstrap, topic_name):
    output, source = f"{topic_name}-out", f"{topic_name}-src"
    ensure_topics(client(kafka_bootstrap), {output: 2, source: 2})
    prefix, whole = f"test-{topic_name}", OffsetRange(source, 0, 0, 500)
    # Transactions of 200 input records in pieces of 50: [0, 200), [200, 400), [400, 500).
    bounds = {"piece_rows": 50, "records": 200}
    asked: list[OffsetRange] = []
    with pytest.raises(RuntimeError, match="injected"):
        produce_exactly_once(client(kafka_bootstrap), whole, _reader(source, 0, asked=asked), _scorer(output, fail_at=250), prefix, 3, **bounds)
    [mark] = _committed(kafka_bootstrap, prefix, source)[:1]
    assert mark.offset == 200 and json.loads(mark.metadata) == {"query": prefix, "batch": 3, "from": 0, "until": 500, "end": 200}

    assert produce_exactly_once(client(kafka_bootstrap), whole, _reader(source, 0, asked=asked), _scorer(output), prefix, 3, **bounds) == 300
    assert asked == [whole, OffsetRange(source, 0, 200, 500)], "the retry reads only what is not written"
    _one_each(kafka_bootstrap, output, source, range(500))
    [mark] = _committed(kafka_bootstrap, prefix, source)[:1]
    assert mark.offset == 500 and json.loads(mark.metadata)["end"] == 500
    assert produce_exactly_once(client(kafka_bootstrap), whole, _reader(source, 0), _scorer(output), prefix, 3, **bounds) == 0

    # Another batch finds the range's mark partway: a copy of the checkpoint, refused.
    with pytest.raises(MarkMismatch, match="marked by batch 3"):
        produce_exactly_once(client(kafka_bootstrap), OffsetRange(source, 0, 400, 500), _reader(source, 0), _scorer(output), prefix, 4)


@pytest.mark.broker
def test_a_mark_left_pending_by_a_dead_task_is_fenced_at_start_not_waited_for(kafka_bootstrap, topic_name):
    """A task killed between sending its mark and committing leaves the transaction open, and the mark pending:
    stable reads of the group wait for it until the broker's transaction timeout. serve's start check fences
    the query's transactional ids first, so it reads at once and the dead task's transaction is aborted."""
    output, source = f"{topic_name}-out", f"{topic_name}-src"
    ensure_topics(client(kafka_bootstrap), {output: 2, source: 2})
    prefix = f"test-{topic_name}"
    assert produce_exactly_once(client(kafka_bootstrap), OffsetRange(source, 0, 0, 300), _reader(source, 0), _scorer(output), prefix, 0) == 300
    # Batch 1's task, as a kill leaves it: its records and its mark sent, the transaction not committed.
    dead = build_client(Producer, transactional_config(client(kafka_bootstrap), transactional_id(prefix, source, 0)))
    dead.init_transactions(30)
    dead.begin_transaction()
    dead.produce(output, b"from the dead task", partition=0)
    batch_1 = OffsetRange(source, 0, 300, 600)
    group = build_client(Consumer, marks_config(client(kafka_bootstrap), prefix))
    dead.send_offsets_to_transaction([TopicPartition(source, 0, 600, mark_metadata(prefix, 1, batch_1))], group.consumer_group_metadata(), 30)
    group.close()
    reader = build_client(Consumer, marks_config(client(kafka_bootstrap), prefix))
    with pytest.raises(KafkaException, match="Timed out"):
        reader.committed([TopicPartition(source, 0)], timeout=5)
    reader.close()

    check_marks(client(kafka_bootstrap), prefix, History(0, {(source, 0): 300}, 1, {(source, 0): 600}))  # fails after 30 s unfenced

    assert [tp.offset for tp in _committed(kafka_bootstrap, prefix, source)] == [300, -1001]
    with pytest.raises(KafkaException):
        dead.commit_transaction(30)  # fenced: the broker aborted its transaction
    assert produce_exactly_once(client(kafka_bootstrap), batch_1, _reader(source, 0), _scorer(output), prefix, 1) == 300
    _one_each(kafka_bootstrap, output, source, range(600))


@pytest.mark.broker
def test_a_task_slower_than_the_transaction_timeout_commits_every_transaction(kafka_bootstrap, topic_name, caplog):
    output, source = f"{topic_name}-out", f"{topic_name}-src"
    ensure_topics(client(kafka_bootstrap), {output: 2, source: 2})
    slow = client(kafka_bootstrap, {"transaction.timeout.ms": "3000"})  # transactions stop reading after 1 s
    whole = OffsetRange(source, 0, 0, 1500)
    caplog.set_level(logging.INFO, logger="streamhydro.kafka.transactions")
    began = time.monotonic()
    # 0.25 s per input batch of 100: 3.75 s in all, longer than the transaction timeout.
    written = produce_exactly_once(slow, whole, _reader(source, 0), _scorer(output, seconds_per_batch=0.25), f"test-{topic_name}", 0, piece_rows=100)
    took = time.monotonic() - began
    assert written == 1500 and took > 3.0, took
    [summary] = [r.getMessage() for r in caplog.records if "transactions:" in r.getMessage()]
    assert int(summary.split(" in ")[1].split()[0]) >= 3, summary
    _one_each(kafka_bootstrap, output, source, range(1500))
    assert _committed(kafka_bootstrap, f"test-{topic_name}", source)[0].offset == 1500


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


def _toml(
    kafka_bootstrap, topics, model_registry, tmp_path, master: str, max_offsets: int, spark_conf: dict[str, str],
    model: str = "iris_like", batch_size: int = 500, kafka_client: dict[str, str] | None = None,
) -> str:
    conf = ", ".join(f'"{key}" = "{value}"' for key, value in {"spark.ui.enabled": "false", **spark_conf}.items())
    client_line = ""
    if kafka_client:
        client_line = "client = { " + ", ".join(f'"{key}" = "{value}"' for key, value in kafka_client.items()) + " }\n"
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
{client_line}
[model]
registry = "{model_registry.root}"
name = "{model}"
version = "latest"

[inference]
providers = ["CPUExecutionProvider"]
batch_size = {batch_size}
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
@pytest.mark.long  # the same fault runs in the default suite inside the two-stage chain (tests/test_read_committed.py)
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


@pytest.mark.broker
def test_a_task_writes_its_range_in_bounded_transactions_with_the_shared_scoring(kafka_bootstrap, topic_name, model_registry, caplog, monkeypatch):
    from _inference_models import Holder
    from streamhydro.config import PayloadSettings
    from streamhydro.executor.direct import RangeIO, score_range
    from streamhydro.executor.scoring import EngineSettings, ScoringPlan
    from streamhydro.executor.sessions import TaskResources
    from streamhydro.kafka import transactions

    topics = {"input": f"{topic_name}-in", "output": f"{topic_name}-out", "dlq": f"{topic_name}-dlq"}
    ensure_topics(client(kafka_bootstrap), {topics["input"]: 1, topics["output"]: 2, topics["dlq"]: 1})
    events = 1000
    version = model_registry.get("iris_like", 1)
    send(kafka_bootstrap, topics["input"], make_values(version.manifest, "json", events, np.random.default_rng(6)))
    plan = ScoringPlan(
        version.manifest, Holder(version.read_bytes()), PayloadSettings(), topics["output"], topics["dlq"],
        EngineSettings(batch_size=100, pipeline_depth=2),  # the scoring reads the transaction's input in its own thread
    )
    monkeypatch.setattr(transactions, "TRANSACTION_RECORDS", 300)
    caplog.set_level(logging.INFO, logger="streamhydro.kafka.transactions")
    prefix = f"test-{topics['input']}"
    whole = OffsetRange(topics["input"], 0, 0, events)
    io = RangeIO(client(kafka_bootstrap), transactional_id_prefix=prefix, batch_id=0)
    assert score_range(plan, io, whole, TaskResources()) == events
    assert any(f"up to offset {events} written by" in m and "in 4 transactions" in m for m in caplog.messages), caplog.messages
    records = read_all(kafka_bootstrap, topics["output"], events, seconds=60, **COMMITTED)
    keys = [json.loads(r.value)["idempotency_key"] for r in records]
    assert sorted(keys) == sorted(f"{topics['input']}/0/{o}" for o in range(events))
    assert _committed(kafka_bootstrap, prefix, topics["input"])[0].offset == events

