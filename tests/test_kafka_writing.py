"""A task's at-least-once write (:func:`streamhydro.kafka.writing.produce_batches`) against a real broker: a
record refused, by the producer itself or by the broker in its delivery callback, fails the write with a
DeliveryError that names it."""

from __future__ import annotations

import pyarrow as pa
import pytest

from conftest import client
from streamhydro.errors import DeliveryError
from streamhydro.kafka.admin import ensure_topics
from streamhydro.kafka.writing import produce_batches

pytestmark = pytest.mark.broker


def _results(topic: str, *values: bytes) -> pa.RecordBatch:
    return pa.RecordBatch.from_pydict({"value": list(values), "topic": [topic] * len(values)})


def test_a_record_too_large_for_the_producer_fails_the_write(kafka_bootstrap, topic_name):
    ensure_topics(client(kafka_bootstrap), {topic_name: 1})
    limited = client(kafka_bootstrap, {"message.max.bytes": "1000"})

    with pytest.raises(DeliveryError, match="too large") as refused:
        produce_batches(limited, [_results(topic_name, b"small", b"x" * 5000)])
    assert refused.value.failed == 1 and refused.value.total == 2


def test_a_record_the_broker_refuses_fails_the_write_from_its_delivery_callback(kafka_bootstrap):
    """An invalid topic name is accepted by ``produce()`` and refused by the broker: the callback path."""
    short = client(kafka_bootstrap, {"message.timeout.ms": "10000"})

    with pytest.raises(DeliveryError, match="nvalid topic"):
        produce_batches(short, [_results("bad topic!", b"v")])
