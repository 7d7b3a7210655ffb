"""The service holds a live stream: events produced *while* the query reads, for half a minute, nothing lost.

Apache Kafka with both connectors, fed the way low-rate producers send (``linger.ms=1``: a tiny record
batch every few milliseconds, what stalled the Tansu-backed service after minutes). Tansu with
streamhydro's connector, fed by a batching producer: a fetch at a new position on Tansu costs more the
more batches a partition holds (see :mod:`streamhydro.brokers.tansu`), so it is only fit for those; that run
is marked ``long`` (``pytest -m long``), and Tansu's connector path stays in the default suite through
``tests/test_kafka_source.py``.
"""

from __future__ import annotations

import logging
import threading
import time

import pytest

from conftest import client
from streamhydro.config import Config
from streamhydro.driver.demo import latency_summary
from streamhydro.driver.serve import Service
from streamhydro.kafka.admin import ensure_topics
from streamhydro.outputs import OutputReader, topic_ends
from streamhydro.producer import LoadGenerator

pytestmark = [pytest.mark.spark, pytest.mark.broker, pytest.mark.slow]

log = logging.getLogger(__name__)

LIVE_SECONDS = 30
RATE = 3000
CATCH_UP_SECONDS = 120


@pytest.mark.parametrize(
    ("broker", "connector", "linger_ms"),
    [("kafka", "python", "1"), ("kafka", "builtin", "1"), pytest.param("tansu", "python", "5", marks=pytest.mark.long)],
)
def test_every_event_produced_live_is_scored(request, broker, connector, linger_ms, topic_name, model_registry, tmp_path, spark):
    bootstrap = request.getfixturevalue(f"{broker}_bootstrap")
    names = {"input": f"{topic_name}-in", "output": f"{topic_name}-out", "dlq": f"{topic_name}-dlq"}
    ensure_topics(client(bootstrap), {names["input"]: 2, names["output"]: 2, names["dlq"]: 1})
    config = Config().replace(
        spark={"master": "local[2]", "checkpoint_location": str(tmp_path / "checkpoint")},
        kafka={
            "bootstrap_servers": bootstrap,
            "subscribe": names["input"],
            "output_topic": names["output"],
            "dead_letter_topic": names["dlq"],
            "source": connector,
            "end_offsets_from": "fetch" if broker == "tansu" else "listOffsets",
        },
        model={"registry": str(model_registry.root), "name": "iris_like", "version": "latest"},
        inference={"providers": ["CPUExecutionProvider"], "pipeline_depth": 0},
        metrics={"enabled": False},
    )
    manifest = model_registry.get("iris_like").manifest
    service = Service(config)
    service.start()
    reader = OutputReader(client(bootstrap), (names["output"], names["dlq"]), track=True)
    reader.start()
    generator = LoadGenerator(client(bootstrap, {"linger.ms": linger_ms}), names["input"], manifest)
    stop = threading.Event()
    timer = threading.Timer(LIVE_SECONDS, stop.set)
    try:
        timer.start()
        generator.run(None, RATE, stop)
        assert service.query.isActive, f"the query stopped while events were produced: {service.query.exception()}"
        deadline = time.monotonic() + CATCH_UP_SECONDS
        while reader.distinct < generator.sent and time.monotonic() < deadline and service.query.isActive:
            time.sleep(0.5)
        assert service.query.isActive, f"the query stopped: {service.query.exception()}"
    finally:
        timer.cancel()
        generator.close()
        reader.stop()
        service.stop()

    ends = topic_ends(client(bootstrap), names["input"])
    assert sum(ends.values()) == generator.sent
    assert generator.sent >= 0.9 * RATE * LIVE_SECONDS, "the producer kept the rate"
    assert reader.missing(ends) == 0, "every event produced live has a prediction"
    assert reader.counts[names["dlq"]] == 0
    log.info("live %s/%s: %d events, %s", broker, connector, generator.sent, latency_summary(reader.latency_ms()))
