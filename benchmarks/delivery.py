"""The cost of exactly-once: ``serve`` with ``kafka.delivery = at_least_once`` and ``exactly_once``, in one run.

    python benchmarks/delivery.py [--events 400000] [--latency-rate 2000] [--latency-seconds 20] [--rounds 2]

``streamhydro serve`` as a process of its own per mode, round and phase (the end-to-end benchmark's
``serve_starter``: serve's defaults, with ``--max-offsets-per-trigger`` and the mode on top), one Apache Kafka
broker, the demo model, the same events, and streamhydro's connector for both modes (exactly-once needs it). The modes take turns for ``--rounds``
rounds and the last round is reported (the first one also warms up the JVM, the Python workers and the
broker, which would favour whichever mode ran second). Per mode and round, two phases:

1. throughput: ``--events`` JSON events lie in the input topic (a partition per core, at least 2) before serve starts; it
   works through them in micro-batches of ``--max-offsets-per-trigger``. Reported: ``cold_start_s`` (query
   start -> first prediction), ``steady_events_per_s`` (predictions after the first 10 % / their arrival
   span), ``missing`` and ``duplicates`` (both must be 0);
2. latency: the query runs on an empty topic, then events are produced live at ``--latency-rate`` for
   ``--latency-seconds`` (``linger.ms=1``); latency = arrival of the prediction - the event's producer
   timestamp, p50 and p99.

Both modes' outputs are read with ``isolation.level=read_committed``, as exactly-once consumers must read
(for at-least-once output it changes nothing): a prediction counts when a consumer can see it. Prints a table to stderr and, as its last line, one JSON
object with both modes and the ratios exactly_once / at_least_once.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from typing import Any

from end_to_end import arguments, backlog, compared, latency, serve_starter, throughput

from streamhydro.brokers import ApacheKafkaBroker
from streamhydro.kafka.options import Connector, Delivery
from streamhydro.registry import Registry

READ_COMMITTED = {"isolation.level": "read_committed"}


def main() -> None:
    parser = arguments(__doc__, latency_rate=2000.0, max_offsets=50_000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

    model = Registry(args.registry).get(args.model, "promoted")
    rows: dict[str, dict[str, Any]] = {}
    with ApacheKafkaBroker() as broker, tempfile.TemporaryDirectory(prefix="streamhydro-bench-") as work:
        bootstrap = broker.bootstrap_servers
        backlog(bootstrap, model.manifest, args.events)
        for turn in range(args.rounds):
            for mode in Delivery:
                name = f"{mode}-r{turn}"
                kafka = {"source": Connector.PYTHON, "delivery": mode, "max_offsets_per_trigger": args.max_offsets_per_trigger}
                start = serve_starter(name, bootstrap, args, work, {"kafka": kafka})
                rows[mode] = {
                    **throughput(start, bootstrap, name, args, READ_COMMITTED),
                    **latency(start, bootstrap, name, model.manifest, args, READ_COMMITTED),
                }
    result: dict[str, Any] = {
        "events": args.events, "max_offsets_per_trigger": args.max_offsets_per_trigger, "rounds": args.rounds,
        "latency_rate_per_s": args.latency_rate, "cpus": os.cpu_count(), **rows,
        "exactly_once_vs_at_least_once": compared(rows[Delivery.EXACTLY_ONCE], rows[Delivery.AT_LEAST_ONCE]),
    }
    for key, value in result.items():
        print(f"{key:>30}  {value}", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
