"""Exactly-once delivery on Apache Kafka: real Spark, the real broker, output read with read_committed.

Faults: a write task that fails with its transaction open and is retried; a kill -9 of the service
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
from confluent_kafka import Consumer, Producer, TopicPartition

from conftest import client, read_all, send
from streamhydro.config import Config
from streamhydro.driver.serve import SPECULATION, Service
from streamhydro.errors import ConfigError
from streamhydro.kafka.admin import ensure_topics
from streamhydro.kafka.clients import build_client
from streamhydro.kafka.options import parse_sink_options
from streamhydro.kafka.source import FORMAT
from streamhydro.kafka.transactions import (
    ORIGIN_END,
    ORIGIN_FIELDS,
    ORIGIN_PARTITION,
    ORIGIN_TOPIC,
    check_transactions,
    with_origin,
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
    with pytest.raises(ConfigError) as unknown:
        Config().replace(kafka={"delivery": "exactly-once"})
    assert unknown.value.key == "kafka.delivery"
    assert Config().replace(kafka={"delivery": "exactly_once", "source": "python"}).kafka.delivery == "exactly_once"


def _kafka_batch(topic: str, partition: int, offsets: list[int]) -> pa.RecordBatch:
    return pa.RecordBatch.from_pydict(
        {"value": [b"v"] * len(offsets), "topic": [topic] * len(offsets), "partition": pa.array([partition] * len(offsets), pa.int32()),
         "offset": pa.array(offsets, pa.int64())}
    )


def test_with_origin_tags_rows_and_gives_the_input_end_to_the_last_batch_only():
    def halves(batches):
        for batch in batches:
            yield batch.slice(0, batch.num_rows // 2).select(["value"])
            yield batch.slice(batch.num_rows // 2).select(["value"])

    tagged = list(with_origin(halves)(iter([_kafka_batch("events", 3, [10, 11, 12, 13]), _kafka_batch("events", 3, [14, 16])])))

    assert [b.num_rows for b in tagged] == [2, 2, 1, 1]
    for batch in tagged:
        assert batch.schema.names == ["value", ORIGIN_TOPIC, ORIGIN_PARTITION, ORIGIN_END]
        assert batch.schema.field(ORIGIN_PARTITION).type == pa.int32() and batch.schema.field(ORIGIN_END).type == pa.int64()
        assert set(batch.column(ORIGIN_TOPIC).to_pylist()) == {"events"} and set(batch.column(ORIGIN_PARTITION).to_pylist()) == {3}
    assert [b.column(ORIGIN_END).to_pylist() for b in tagged] == [[None, None], [None, None], [None], [17]]
    assert list(with_origin(halves)(iter([]))) == []


def test_exactly_once_sink_options_name_what_is_missing():
    base = {"kafka.bootstrap.servers": "b:9092", "delivery": "exactly_once"}
    with pytest.raises(ConfigError) as refused:
        parse_sink_options({**base, "endOffsets": '{"events": {"0": 5}}'})
    assert refused.value.key == "transactionalIdPrefix"
    with pytest.raises(ConfigError) as refused:
        parse_sink_options({**base, "transactionalIdPrefix": "q"})
    assert refused.value.key == "endOffsets"
    with pytest.raises(ConfigError) as refused:
        parse_sink_options({"kafka.bootstrap.servers": "b:9092", "kafka.transactional.id": "mine"})
    assert refused.value.key == "kafka.transactional.id"
    with pytest.raises(ConfigError) as refused:
        parse_sink_options({"kafka.bootstrap.servers": "b:9092", "delivery": "twice"})
    assert refused.value.key == "delivery"
    options = parse_sink_options({**base, "transactionalIdPrefix": "q", "endOffsets": '{"events": {"1": 7, "0": 5}}', "batchId": "4"})
    assert options.exactly_once and options.end_offsets == ((("events", 0), 5), (("events", 1), 7)) and options.batch_id == 4
    assert not parse_sink_options({"kafka.bootstrap.servers": "b:9092"}).exactly_once


@pytest.mark.broker
def test_the_transaction_probe_accepts_apache_kafka_and_refuses_tansu(kafka_bootstrap, tansu_bootstrap):
    check_transactions(client(kafka_bootstrap))
    with pytest.raises(ConfigError) as refused:
        check_transactions(client(tansu_bootstrap))
    assert refused.value.key == "kafka.delivery"
    assert "does not isolate transactions" in refused.value.problem and "the aborted record among them" in refused.value.problem


@pytest.mark.spark
@pytest.mark.broker
def test_start_refuses_auto_choosing_the_builtin_sink_and_speculation(kafka_bootstrap, topics, model_registry, tmp_path, spark):
    auto = Service(service_config(kafka_bootstrap, topics, model_registry, tmp_path, source="auto"))
    try:
        with pytest.raises(ConfigError) as refused:
            auto.start()
    finally:
        auto.close()
    assert refused.value.key == "kafka.delivery" and "built-in" in refused.value.problem

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


def _origin_rows(output: str, source: str, per_partition: int, end: int | None) -> list[tuple]:
    """Output rows as ``with_origin`` tags them, for offsets 0.. of partitions 0 and 1 of ``source``: the last
    row of each partition carries ``end`` as its ``source_end``, the others null."""
    return [
        (f"{p}-{o}".encode(), output, source, p, end if o == per_partition - 1 else None)
        for p in (0, 1)
        for o in range(per_partition)
    ]


def _write(spark, kafka_bootstrap, rows, prefix: str, ends: dict, partitions: int = 2) -> None:
    from pyspark.sql.types import BinaryType, StringType, StructField, StructType

    schema = StructType([StructField("value", BinaryType()), StructField("topic", StringType()), *ORIGIN_FIELDS.fields])
    frame = spark.createDataFrame(spark.sparkContext.parallelize(rows, partitions), schema)
    (
        frame.write.format(FORMAT).mode("append")
        .option("kafka.bootstrap.servers", kafka_bootstrap)
        .option("delivery", "exactly_once")
        .option("transactionalIdPrefix", prefix)
        .option("endOffsets", json.dumps(ends))
        .save()
    )


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


@pytest.mark.spark
@pytest.mark.broker
def test_the_sink_writes_a_whole_range_once_and_records_it_in_the_same_transaction(kafka_bootstrap, topic_name, spark):
    output, source = f"{topic_name}-out", f"{topic_name}-src"
    ensure_topics(client(kafka_bootstrap), {output: 2, source: 2})
    producer = build_client(Producer, client(kafka_bootstrap))
    for offset in range(300):
        for partition in (0, 1):
            producer.produce(source, f"event-{offset}".encode(), partition=partition)
    producer.flush(30)
    ends = {source: {"0": 300, "1": 300}}
    rows = _origin_rows(output, source, 300, end=300)
    prefix = f"test-{topic_name}"

    _write(spark, kafka_bootstrap, rows, prefix, ends)
    written = read_all(kafka_bootstrap, output, len(rows), **COMMITTED)
    assert sorted(r.value for r in written) == sorted(r[0] for r in rows)
    committed = _committed(kafka_bootstrap, prefix, source)
    assert [tp.offset for tp in committed] == [300, 300] and json.loads(committed[0].metadata) == {"batch": None}
    log_end = _log_end(kafka_bootstrap, output)

    _write(spark, kafka_bootstrap, rows, prefix, ends)
    assert _log_end(kafka_bootstrap, output) == log_end, "a range already written must not be written again, not even aborted"

    _write(spark, kafka_bootstrap, rows, f"{prefix}-other", ends)
    assert len(read_all(kafka_bootstrap, output, 2 * len(rows), **COMMITTED)) == 2 * len(rows), "another query writes its own"

    with pytest.raises(Exception, match="ended before the scoring finished"):
        _write(spark, kafka_bootstrap, _origin_rows(output, source, 300, end=None), f"{prefix}-cut", ends)
    with pytest.raises(Exception, match="ended at offset 250, short of 300"):
        _write(spark, kafka_bootstrap, _origin_rows(output, source, 250, end=250), f"{prefix}-short", ends)
    with pytest.raises(Exception, match="one exactly-once write task got rows from"):
        _write(spark, kafka_bootstrap, rows, f"{prefix}-mixed", ends, partitions=1)
    assert len(read_all(kafka_bootstrap, output, 2 * len(rows) + 1, seconds=5, **COMMITTED)) == 2 * len(rows)
    assert [tp.offset for tp in _committed(kafka_bootstrap, f"{prefix}-short", source)] == [-1001, -1001]


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
    # Arrow batches of 500 rows into the write, so that the first scored batch reaches the writer at once.
    toml = _toml(kafka_bootstrap, topics, model_registry, tmp_path, "local[2,2]", 1500, {"spark.sql.execution.arrow.maxRecordsPerBatch": "500"})
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
