"""Read committed input: ranges planned against the last stable offset, aborted records and transaction
markers never scored and never reported as loss.

The broker test measures what librdkafka does on Apache Kafka with committed, aborted and open
transactions in one partition, then reads ranges through streamhydro's planner probe and reader.
"""

from __future__ import annotations

import threading
import time

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from conftest import client
from streamhydro.config import Config
from streamhydro.errors import ConfigError
from streamhydro.kafka.admin import ensure_topics
from streamhydro.kafka.clients import build_client
from streamhydro.kafka.offsets import EndOffsetProbe
from streamhydro.kafka.options import ClientConfig, client_for, parse_source_options
from streamhydro.kafka.planning import OffsetRange
from streamhydro.kafka.reading import read_range, reader_config

COMMITTED = {"isolation.level": "read_committed"}


def test_isolation_level_reaches_both_connectors_readers_and_the_planner():
    kafka = Config().replace(kafka={"client": COMMITTED}).kafka
    assert kafka.source_options()["kafka.isolation.level"] == "read_committed"  # Spark's JVM source
    options = parse_source_options({**kafka.source_options()})
    assert reader_config(options.client).get("isolation.level") == "read_committed"
    assert EndOffsetProbe(options.client)._config.get("isolation.level") == "read_committed"
    default = Config().kafka.librdkafka()
    assert EndOffsetProbe(default)._config.get("isolation.level") == "read_uncommitted"
    assert reader_config(default).get("isolation.level") == "read_uncommitted"


def test_an_unknown_isolation_level_is_refused_at_start():
    with pytest.raises(ConfigError) as info:
        Config().replace(kafka={"client": {"isolation.level": "committed"}})
    assert info.value.key == "kafka.client.isolation.level"


def _transactional(bootstrap: str, topic: str) -> Producer:
    producer = Producer({**client_for(bootstrap).as_dict(), "transactional.id": f"{topic}-tx", "linger.ms": 0})
    producer.init_transactions(30)
    return producer


def _transaction(producer: Producer, topic: str, values: list[bytes], commit: bool | None) -> None:
    producer.begin_transaction()
    for value in values:
        producer.produce(topic, value, partition=0)
    producer.flush(30)
    if commit is True:
        producer.commit_transaction(30)
    elif commit is False:
        producer.abort_transaction(30)


def _read(config: ClientConfig, topic: str, start: int, until: int) -> list[bytes]:
    consumer = build_client(Consumer, reader_config(config))
    try:
        return [v for b in read_range(consumer, OffsetRange(topic, 0, start, until), True, 10_000) for v in b.column("value").to_pylist()]
    finally:
        consumer.close()


@pytest.mark.broker
def test_read_committed_ranges_end_at_the_last_stable_offset_and_skip_aborted_records(kafka_bootstrap, topic_name, capsys):
    ensure_topics(client(kafka_bootstrap), {topic_name: 1})
    producer = _transactional(kafka_bootstrap, topic_name)
    _transaction(producer, topic_name, [b"c0", b"c1", b"c2"], commit=True)  # offsets 0-2, marker 3
    _transaction(producer, topic_name, [b"a0", b"a1", b"a2"], commit=False)  # offsets 4-6, marker 7
    _transaction(producer, topic_name, [b"c3", b"c4"], commit=True)  # offsets 8-9, marker 10
    _transaction(producer, topic_name, [b"o0", b"o1"], commit=None)  # offsets 11-12, still open
    committed, uncommitted = client(kafka_bootstrap, COMMITTED), client(kafka_bootstrap)
    tp = TopicPartition(topic_name, 0)

    # What librdkafka says: ListOffsets honours isolation.level (the last stable offset, 11, for read_committed).
    facts = {}
    for name, config in (("read_uncommitted", uncommitted), ("read_committed", committed)):
        consumer = build_client(Consumer, reader_config(config))
        facts[f"{name} ListOffsets"] = consumer.get_watermark_offsets(tp, timeout=10, cached=False)
        consumer.assign([TopicPartition(topic_name, 0, 0)])
        seen = []
        while True:
            message = consumer.poll(5)
            assert message is not None, "no end-of-partition event"
            if message.error() is not None:
                facts[f"{name} end-of-partition at"] = message.offset()
                break
            seen.append(message.offset())
        facts[f"{name} fetched offsets"] = seen
        facts[f"{name} cached high watermark"] = consumer.get_watermark_offsets(tp, cached=True)
        consumer.close()
    with capsys.disabled():
        print("\nlibrdkafka on Apache Kafka, 3 committed, 3 aborted, 2 committed, 2 open:", facts)
    assert facts["read_uncommitted ListOffsets"] == (0, 13)
    assert facts["read_committed ListOffsets"] == (0, 11)
    assert facts["read_committed fetched offsets"] == [0, 1, 2, 8, 9]
    assert facts["read_committed end-of-partition at"] == 11
    assert facts["read_committed cached high watermark"][1] == 13  # not the last stable offset: not used as an end

    # The planner's probe ends ranges at the last stable offset, by ListOffsets and by fetch (end-of-partition).
    for use_fetch in (False, True):
        probe = EndOffsetProbe(committed, use_fetch=use_fetch)
        assert probe.offset_ranges([(topic_name, 0)]) == {(topic_name, 0): (0, 11)}, use_fetch
        probe.close()

    # Ranges through the reader: aborted records and markers are gaps, never loss.
    assert _read(committed, topic_name, 0, 11) == [b"c0", b"c1", b"c2", b"c3", b"c4"]
    assert _read(committed, topic_name, 0, 8) == [b"c0", b"c1", b"c2"]  # ends on an aborted batch and its marker
    assert _read(committed, topic_name, 4, 8) == []  # nothing but aborted records
    assert _read(committed, topic_name, 3, 9) == [b"c3"]

    # A range planned past the last stable offset (an older plan) waits for the open transaction, not loss.
    threading.Timer(2.0, producer.commit_transaction, args=(30,)).start()  # offsets 11-12 commit, marker 13
    started = time.monotonic()
    assert _read(committed, topic_name, 8, 13) == [b"c3", b"c4", b"o0", b"o1"]
    assert time.monotonic() - started >= 1.5
    probe = EndOffsetProbe(committed)
    assert probe.offset_ranges([(topic_name, 0)]) == {(topic_name, 0): (0, 14)}
    probe.close()
    assert _read(committed, topic_name, 8, 14) == [b"c3", b"c4", b"o0", b"o1"]


def _chain_registry(root):
    """A registry with ``iris_like`` (four features of the event) and ``second_stage``, which reads the
    first stage's prediction records: its features are the three class scores, ``prediction.scores.<label>``."""
    import dataclasses

    from _inference_models import softmax_model
    from streamhydro.registry import Registry, TensorSpec

    registry = Registry(root)
    labels = ("setosa", "versicolor", "virginica")
    features = ("sepal_length", "sepal_width", "petal_length", "petal_width")
    model, manifest = softmax_model([TensorSpec("features", "float32", (-1, 4), features)], labels)
    registry.publish(dataclasses.replace(manifest, name="iris_like"), model)
    scores = tuple(f"prediction.scores.{label}" for label in labels)
    model, manifest = softmax_model([TensorSpec("features", "float32", (-1, 3), scores)], ("low", "high"), seed=1)
    registry.publish(dataclasses.replace(manifest, name="second_stage"), model)
    return registry


@pytest.mark.spark
@pytest.mark.broker
@pytest.mark.slow
def test_a_two_stage_exactly_once_chain_scores_each_committed_event_once(kafka_bootstrap, topic_name, tmp_path):
    """Stage 1 (A -> B) and stage 2 (B -> C), both ``streamhydro serve`` with exactly_once, reading
    read_committed, run side by side. A holds committed and aborted transactions interleaved; stage 1's
    first task fails with its transaction open (so B holds aborted records too) and is retried."""
    import json

    import numpy as np

    from test_exactly_once import COMMITTED as READ_COMMITTED
    from test_exactly_once import RUN_SECONDS, _serve, _stop, _toml
    from conftest import read_all
    from streamhydro.producer import make_values

    registry = _chain_registry(tmp_path / "registry")
    a, b, c = (f"{topic_name}-{name}" for name in "abc")
    ensure_topics(client(kafka_bootstrap), {a: 2, b: 2, c: 2, f"{b}-dlq": 1, f"{c}-dlq": 1})

    producer = Producer({**client_for(kafka_bootstrap).as_dict(), "transactional.id": f"{a}-upstream", "linger.ms": 5})
    producer.init_transactions(30)
    values = make_values(registry.get("iris_like").manifest, "json", 2400, np.random.default_rng(9))
    committed, aborted = [], []
    for t in range(24):  # transactions of 100 events: committed, aborted, committed, committed, aborted, ...
        keys = [f"event-{n}" for n in range(t * 100, t * 100 + 100)]
        producer.begin_transaction()
        for key, value in zip(keys, values[t * 100 : t * 100 + 100], strict=True):
            producer.produce(a, value, key=key.encode())
        producer.flush(30)
        if t % 3 == 1:
            producer.abort_transaction(30)
            aborted.extend(keys)
        else:
            producer.commit_transaction(30)
            committed.extend(keys)

    read = {"isolation.level": "read_committed"}
    stages = []
    # Stage 1 in micro-batches of at most 800 offsets and model batches of 50, so that a task after its
    # warm-up (the fault's trigger) scores a third batch; Spark retries its tasks (local[2,2]).
    for name, topics, model, master, max_offsets, batch_size, fault in (
        ("stage1", {"input": a, "output": b, "dlq": f"{b}-dlq"}, "iris_like", "local[2,2]", 800, 50, ("fail-mid-write", str(tmp_path / "fault-claimed"))),
        ("stage2", {"input": b, "output": c, "dlq": f"{c}-dlq"}, "second_stage", "local[2]", 100_000, 100, None),
    ):
        folder = tmp_path / name
        folder.mkdir()
        toml = _toml(kafka_bootstrap, topics, registry, folder, master, max_offsets, {}, model=model, batch_size=batch_size, kafka_client=read)
        stages.append(_serve(folder, toml, name, fault=fault))
    try:
        records = read_all(kafka_bootstrap, c, len(committed), seconds=RUN_SECONDS, **READ_COMMITTED)
    finally:
        for process, log in stages:
            _stop(process, log)
    keys = [json.loads(r.value)["key"] for r in records]
    assert len(keys) == len(set(keys)), f"{len(keys) - len(set(keys))} duplicates"
    assert sorted(keys) == sorted(committed), f"lost {sorted(set(committed) - set(keys))[:5]}, aborted {sorted(set(keys) & set(aborted))[:5]}"
    assert {json.loads(r.value)["model"]["name"] for r in records} == {"second_stage"}
    assert (tmp_path / "fault-claimed").exists(), "stage 1's fault was never injected"
    in_b = read_all(kafka_bootstrap, b, len(committed) + 1, seconds=10)
    assert len(in_b) > len(committed), "stage 1's failed attempt left aborted records in B"
    for dlq in (f"{b}-dlq", f"{c}-dlq"):
        assert read_all(kafka_bootstrap, dlq, 1, seconds=2, **READ_COMMITTED) == []
