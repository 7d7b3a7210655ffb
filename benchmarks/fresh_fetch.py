"""Why a live stream stalled on Tansu: the cost of a fetch at a new position as a partition fills.

    python benchmarks/fresh_fetch.py [--seconds 40] [--rate 5000]

For each local broker (Apache Kafka, Tansu), a producer sends 100-byte records to one partition at
``--rate`` with ``linger.ms=1`` (a small record batch every millisecond or two, as low-rate producers
send). Every two seconds a consumer is assigned at the partition's end - 1 (a position it never read,
as every micro-batch task and every end-offset probe starts) and the time until that one record arrives
is taken, up to 15 s. Prints a line per probe to stderr and, last, one JSON object with each broker's
probes (records in the partition, seconds) and the worst probe.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

from confluent_kafka import Consumer, Producer, TopicPartition

from streamhydro.brokers import BROKERS
from streamhydro.kafka.admin import ensure_topics
from streamhydro.kafka.clients import build_client
from streamhydro.kafka.options import client_for

PROBE_TIMEOUT_S = 15.0


def probe_broker(kind: str, seconds: float, rate: float) -> list[tuple[int, float]]:
    with BROKERS[kind]() as broker:
        bootstrap = broker.bootstrap_servers
        ensure_topics(client_for(bootstrap), {"fresh": 1})
        producer = build_client(Producer, client_for(bootstrap, {"linger.ms": "1", "acks": "all"}))
        consumer = build_client(
            Consumer, client_for(bootstrap, {"fetch.wait.max.ms": "10"}).with_defaults({"group.id": "fresh-fetch"})
        )
        stop = threading.Event()

        def produce() -> None:
            due = time.monotonic()
            while not stop.is_set():
                producer.produce("fresh", b"x" * 100)
                producer.poll(0)
                due += 1 / rate
                time.sleep(max(0.0, due - time.monotonic()))

        sender = threading.Thread(target=produce, daemon=True)
        sender.start()
        probes = []
        started = time.monotonic()
        try:
            while time.monotonic() - started < seconds:
                time.sleep(2)
                _, end = consumer.get_watermark_offsets(TopicPartition("fresh", 0), timeout=10, cached=False)
                began = time.monotonic()
                consumer.assign([TopicPartition("fresh", 0, max(end - 1, 0))])
                got = False
                while not got and time.monotonic() - began < PROBE_TIMEOUT_S:
                    got = any(m.error() is None for m in consumer.consume(10, timeout=0.05))
                took = round(time.monotonic() - began, 3)
                consumer.unassign()
                probes.append((end, took if got else None))
                print(f"{kind}: {end} records, fetch at a new position {took if got else 'timed out'} s", file=sys.stderr, flush=True)
        finally:
            stop.set()
            sender.join()
            producer.flush(10)
            consumer.close()
        return probes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--rate", type=float, default=5000.0)
    args = parser.parse_args()
    result = {"rate": args.rate, "probe_timeout_s": PROBE_TIMEOUT_S}
    for kind in ("kafka", "tansu"):
        probes = probe_broker(kind, args.seconds, args.rate)
        result[kind] = {
            "probes": probes,
            "worst_s": max((p[1] if p[1] is not None else PROBE_TIMEOUT_S) for p in probes),
            "timed_out": sum(p[1] is None for p in probes),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
