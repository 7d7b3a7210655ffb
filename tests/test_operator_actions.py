"""What an operator does to an exactly-once query's consumer group, with Apache Kafka's own
``kafka-consumer-groups`` (``ConsumerGroupCommand`` from the jar cache): reset to latest, reset to earliest,
delete the group, and a second deployment started from a copy of the checkpoint. Each is refused, with a
message naming the group and the fix, instead of skipping or rewriting; the fix the message names, run
with the same tool, lets the query resume exactly once.

The broker tests call the task's write (``produce_exactly_once``) and the start check (``check_marks``)
directly; one Spark test runs ``streamhydro serve`` through all the actions in sequence.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import Producer

from conftest import client, read_all, send
from streamhydro import jars
from streamhydro.brokers.process import java_binary
from streamhydro.kafka.admin import ensure_topics
from streamhydro.kafka.marks import GroupMismatch, History, check_marks, ensure_anchor
from streamhydro.kafka.planning import OffsetRange
from streamhydro.kafka.transactions import MarkMismatch, produce_exactly_once
from streamhydro.producer import make_values
from test_exactly_once import (  # noqa: F401 -- topics is a fixture
    COMMITTED, RUN_SECONDS, _committed, _exactly_once, _log_end, _one_each, _reader, _scorer, _serve, _stop, _toml, topics,
)

TOOL = "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand"
# A command a message names, as an operator would copy it.
COMMAND = re.compile(r"kafka-consumer-groups\.sh (--bootstrap-server <servers> .*? --execute)")


@pytest.fixture(scope="module")
def consumer_groups(kafka_bootstrap):
    """``kafka-consumer-groups.sh ARGS`` against the test broker: Apache Kafka's tool, from the jar cache."""
    classpath = os.pathsep.join(str(jar) for jar in jars.resolve(jars.kafka_tools()))

    def run(*args: str) -> str:
        done = subprocess.run(
            [java_binary(), "-Xmx256m", "-cp", classpath, TOOL, "--bootstrap-server", kafka_bootstrap, *args],
            capture_output=True, text=True, timeout=120, check=False,
        )
        assert done.returncode == 0, f"kafka-consumer-groups {' '.join(args)}: {done.stdout}{done.stderr}"
        return done.stdout

    return run


def apply_fix(consumer_groups, message: str) -> list[str]:
    """Run every ``kafka-consumer-groups`` command ``message`` names; returns them."""
    commands = COMMAND.findall(message)
    assert commands, message
    for command in commands:
        args = command.split()
        assert args[:2] == ["--bootstrap-server", "<servers>"]
        consumer_groups(*args[2:])
    return commands


def _fill(kafka_bootstrap, source: str, counts: dict[int, int]) -> None:
    """``counts[p]`` records in ``source[p]``: the task's reads are made up (``_reader``), but
    kafka-consumer-groups moves an offset past a partition's end back to the end."""
    producer = Producer(client(kafka_bootstrap).as_dict())
    for partition, count in counts.items():
        for _ in range(count):
            producer.produce(source, b"x", partition=partition)
    assert producer.flush(30) == 0


def _write(kafka_bootstrap, source, output, prefix, batch, ranges, **kwargs) -> list[int]:
    return [
        produce_exactly_once(client(kafka_bootstrap), r, _reader(source, r.partition), _scorer(output), prefix, batch, **kwargs) for r in ranges
    ]


@pytest.mark.broker
def test_reset_to_earliest_is_refused_not_rewritten(kafka_bootstrap, topic_name, consumer_groups):
    output, source = f"{topic_name}-out", f"{topic_name}-src"
    ensure_topics(client(kafka_bootstrap), {output: 2, source: 1})
    _fill(kafka_bootstrap, source, {0: 900})
    prefix = f"test-{topic_name}"
    assert _write(kafka_bootstrap, source, output, prefix, 0, [OffsetRange(source, 0, 0, 300)]) == [300]
    assert _write(kafka_bootstrap, source, output, prefix, 1, [OffsetRange(source, 0, 300, 600)]) == [300]

    consumer_groups("--group", prefix, "--reset-offsets", "--topic", source, "--to-earliest", "--execute")
    [mark] = _committed(kafka_bootstrap, prefix, source)[:1]
    assert mark.offset == 0 and not mark.metadata, "the tool sets the log start and leaves no metadata"
    # The task: neither the replay of batch 1 nor batch 2 takes the reset mark as "nothing written".
    for batch, offsets in ((1, OffsetRange(source, 0, 300, 600)), (2, OffsetRange(source, 0, 600, 900))):
        with pytest.raises(MarkMismatch, match=rf"consumer group {prefix} marks {source}\[0\] written up to offset 0"):
            produce_exactly_once(client(kafka_bootstrap), offsets, _reader(source, 0), _scorer(output), prefix, batch)
    # The start: the checkpoint says batch 1 ended at 600.
    history = History(1, {(source, 0): 600}, advanced=frozenset({(source, 0)}))
    with pytest.raises(GroupMismatch) as refused:
        check_marks(client(kafka_bootstrap), prefix, history)
    assert f"{source}[0] is marked at 0, before offset 600 where batch 1 ended" in str(refused.value)
    assert apply_fix(consumer_groups, str(refused.value)) == [f"--bootstrap-server <servers> --group {prefix} --reset-offsets --topic {source}:0 --to-offset 600 --execute"]

    check_marks(client(kafka_bootstrap), prefix, history)
    assert _write(kafka_bootstrap, source, output, prefix, 2, [OffsetRange(source, 0, 600, 900)]) == [300]
    _one_each(kafka_bootstrap, output, source, range(900))


@pytest.mark.broker
def test_a_deleted_group_is_refused_at_start_and_by_the_next_task(kafka_bootstrap, topic_name, consumer_groups):
    output, source = f"{topic_name}-out", f"{topic_name}-src"
    ensure_topics(client(kafka_bootstrap), {output: 2, source: 2})
    _fill(kafka_bootstrap, source, {0: 900, 1: 300})
    prefix = f"test-{topic_name}"
    ensure_anchor(client(kafka_bootstrap), prefix)  # what serve does before the query's first write
    # Batch 0 writes [0, 300) of both partitions, batch 1 [300, 600) of partition 0 only.
    assert _write(kafka_bootstrap, source, output, prefix, 0, [OffsetRange(source, p, 0, 300) for p in (0, 1)], anchored=True) == [300, 300]
    assert _write(kafka_bootstrap, source, output, prefix, 1, [OffsetRange(source, 0, 300, 600)], anchored=True) == [300]

    assert "successful" in consumer_groups("--delete", "--group", prefix)
    assert [tp.offset for tp in _committed(kafka_bootstrap, prefix, source)] == [-1001, -1001]
    log_end = _log_end(kafka_bootstrap, output)
    # The query still runs: batch 2's task finds no mark, but no anchor either, and writes nothing.
    with pytest.raises(MarkMismatch, match="anchor .* is gone: the group was deleted"):
        _write(kafka_bootstrap, source, output, prefix, 2, [OffsetRange(source, 0, 600, 900)], anchored=True)
    assert _log_end(kafka_bootstrap, output) == log_end
    # The restart: partition 1 moved only in batch 0, which the log cannot vouch for; the missing anchor does.
    history = History(1, {(source, 0): 600, (source, 1): 300}, advanced=frozenset({(source, 0)}))
    with pytest.raises(GroupMismatch) as refused:
        check_marks(client(kafka_bootstrap), prefix, history)
    message = str(refused.value)
    assert f"{source}[0] has no mark, where batch 1 ended at 600" in message and f"{source}[1] has no mark" in message
    assert "was deleted" in message
    apply_fix(consumer_groups, message)

    check_marks(client(kafka_bootstrap), prefix, history)  # restored by hand: accepted, the anchor committed again
    assert _write(kafka_bootstrap, source, output, prefix, 2, [OffsetRange(source, 0, 600, 900)], anchored=True) == [300]
    written = read_all(kafka_bootstrap, output, 1200, seconds=60, **COMMITTED)
    expected = [f"{source}-0-{o}".encode() for o in range(900)] + [f"{source}-1-{o}".encode() for o in range(300)]
    assert sorted(r.value for r in written) == sorted(expected)


def _query_group(checkpoint: Path) -> str:
    return f"streamhydro-{json.loads((checkpoint / 'metadata').read_text())['id']}"


def _refused(tmp_path: Path, toml: str, name: str) -> str:
    """Run serve, expect it to refuse to start; returns its one-line error."""
    process, log = _serve(tmp_path, toml, name)
    try:
        code = process.wait(timeout=RUN_SECONDS)
    finally:
        if process.poll() is None:
            process.kill()
    text = log.read_text()
    errors = [line for line in text.splitlines() if line.startswith("streamhydro: error: ")]
    assert code != 0 and errors, text[-5000:]
    return errors[-1]


@pytest.mark.spark
@pytest.mark.broker
@pytest.mark.slow
def test_operator_actions_on_a_running_deployment(kafka_bootstrap, topics, model_registry, tmp_path, consumer_groups):
    manifest = model_registry.get("iris_like").manifest
    send(kafka_bootstrap, topics["input"], make_values(manifest, "json", 600, np.random.default_rng(7)))
    toml = _toml(kafka_bootstrap, topics, model_registry, tmp_path, "local[2]", 1000, {})
    process, log = _serve(tmp_path, toml, "first")
    try:
        _exactly_once(kafka_bootstrap, topics, 600)
    finally:
        _stop(process, log)
    checkpoint = tmp_path / "checkpoint"
    group = _query_group(checkpoint)
    copy = tmp_path / "copy"
    shutil.copytree(checkpoint, copy / "checkpoint")
    send(kafka_bootstrap, topics["input"], make_values(manifest, "json", 400, np.random.default_rng(8)), first_key=600)
    output_end = _log_end(kafka_bootstrap, topics["output"])

    actions = {
        "reset to latest": (("--reset-offsets", "--topic", topics["input"], "--to-latest", "--execute"), "reset forwards"),
        "reset to earliest": (("--reset-offsets", "--topic", topics["input"], "--to-earliest", "--execute"), "reset backwards"),
        "group deleted": (("--delete",), "was deleted"),
    }
    for name, (action, cause) in actions.items():
        consumer_groups("--group", group, *action)
        error = _refused(tmp_path, toml, name.replace(" ", "-"))
        assert f"consumer group {group} does not match this query's checkpoint" in error and cause in error, (name, error)
        assert _log_end(kafka_bootstrap, topics["output"]) == output_end, f"{name}: nothing written, not even aborted"
        apply_fix(consumer_groups, error)

    process, log = _serve(tmp_path, toml, "resumed")
    try:
        _exactly_once(kafka_bootstrap, topics, 1000)
    finally:
        _stop(process, log)

    # A second deployment from the copy made after the first run: its checkpoint is behind the group.
    error = _refused(copy, toml.replace(str(checkpoint), str(copy / "checkpoint")), "copy")
    assert f"consumer group {group} does not match" in error and "another deployment with a copy of this checkpoint" in error
    assert "is marked at" in error and "past offset" in error
    _exactly_once(kafka_bootstrap, topics, 1000)
