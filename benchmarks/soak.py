"""Soak: ``streamhydro serve`` as a subprocess against a live producer, for minutes or hours.

    python benchmarks/soak.py --minutes 60 --rate 5000                 # Apache Kafka, Spark's JVM connector
    python benchmarks/soak.py --minutes 5 --rate 5000 --source python
    python benchmarks/soak.py --minutes 5 --rate 2000 --broker tansu   # streamhydro's connector, fetch ends

A local broker starts in its own process group; ``serve`` runs as users run it (``python -m streamhydro
serve --config FILE``, its own process group too). Once its first predictions (of 100 warm-up events)
are out, a producer sends events live at ``--rate`` with
``linger.ms=1`` (every few milliseconds a small batch, as low-rate producers send), and a reader takes
the time as each prediction arrives. Every ``--sample-seconds`` a progress line goes to stderr: events,
distinct predictions, lag (events without a prediction yet), latency p50/p99 of that interval, and the
RSS of serve's whole process tree (driver, JVM, Python worker daemons and workers).

After ``--minutes`` the producer stops, the reader waits for the predictions to catch up, serve gets
SIGTERM, and the last line on stdout is JSON: events, predictions (distinct events predicted),
duplicates, lost, max and final lag, lag over the first and the second half, latency p50/p99 (ms),
RSS at start (first prediction) and at the end (MB), query failures (serve exiting on its own), serve's
exit code, and the log file.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from streamhydro.brokers import BROKERS
from streamhydro.driver.demo import latency_summary
from streamhydro.kafka.admin import ensure_topics
from streamhydro.kafka.options import Connector, EndOffsets, client_for
from streamhydro.outputs import OutputReader, topic_ends
from streamhydro.producer import LoadGenerator
from streamhydro.registry import Registry
from streamhydro.harness.supervisor import ServeProcess, write_serve_config

PARTITIONS = 2
CATCH_UP_SECONDS = 180
WARM_UP_EVENTS = 100
START_DEADLINE_S = 300


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--rate", type=float, default=5000.0)
    parser.add_argument("--broker", choices=sorted(BROKERS), default="kafka")
    parser.add_argument("--source", type=Connector, choices=list(Connector), default=Connector.BUILTIN)
    parser.add_argument("--sample-seconds", type=float, default=30.0)
    args = parser.parse_args()
    if args.broker == "tansu" and args.source != Connector.PYTHON:
        parser.error("Tansu needs --source python (the JVM connector trusts its wrong ListOffsets)")

    work = Path(tempfile.mkdtemp(prefix="streamhydro-soak-"))
    with BROKERS[args.broker]() as broker:
        bootstrap = broker.bootstrap_servers
        ensure_topics(client_for(bootstrap), {"events": PARTITIONS, "predictions": PARTITIONS, "predictions-dlq": 1})
        end_offsets_from = EndOffsets.FETCH if args.broker == "tansu" else EndOffsets.LIST_OFFSETS
        config = write_serve_config(work / "serve.toml", work, bootstrap, kafka={"source": args.source, "end_offsets_from": end_offsets_from})
        serve = ServeProcess(config, work / "serve.log")
        serve.start()
        print(f"serve pid {serve.pid}, log {serve.log_path}", file=sys.stderr, flush=True)
        try:
            result = soak(args, bootstrap, serve)
        finally:
            serve.kill()
        result.update(broker=args.broker, source=args.source, log=str(serve.log_path))
    print(json.dumps(result))


def soak(args: argparse.Namespace, bootstrap: str, serve: ServeProcess) -> dict:
    manifest = Registry("models").get("breast_cancer").manifest
    reader = OutputReader(client_for(bootstrap), ("predictions", "predictions-dlq"), track=True, group="soak-reader")
    reader.start()
    launched = time.monotonic()
    warm_up = LoadGenerator(client_for(bootstrap), "events", manifest, seed=1)
    warm_up.run(WARM_UP_EVENTS, None, threading.Event())
    warm_up.close()
    while reader.distinct < WARM_UP_EVENTS:
        if serve.poll() is not None or time.monotonic() - launched > START_DEADLINE_S:
            raise SystemExit(f"serve did not predict its first {WARM_UP_EVENTS} events within {START_DEADLINE_S} s")
        time.sleep(0.1)
    first_predictions_s = round(time.monotonic() - launched, 1)
    generator = LoadGenerator(client_for(bootstrap, {"linger.ms": "1"}), "events", manifest)
    stop = threading.Event()
    producing = threading.Thread(target=generator.run, args=(None, args.rate, stop), daemon=True)
    started = time.monotonic()
    producing.start()
    lags: list[tuple[float, int]] = []
    rss_start = None
    seen_latencies = 0
    try:
        while time.monotonic() - started < args.minutes * 60 and serve.poll() is None:
            time.sleep(args.sample_seconds)
            lag = WARM_UP_EVENTS + generator.sent - reader.distinct
            lags.append((time.monotonic() - started, lag))
            if rss_start is None and reader.distinct:
                rss_start = serve.rss_mb()
            recent = reader.latency_ms(since=seen_latencies)
            seen_latencies += len(recent)
            print(
                json.dumps({
                    "t_s": round(time.monotonic() - started), "events": generator.sent, "predictions": reader.distinct - WARM_UP_EVENTS,
                    "lag": lag, **latency_summary(recent), "rss_mb": serve.rss_mb(),
                }),
                file=sys.stderr, flush=True,
            )
    finally:
        stop.set()
        producing.join()
        generator.close()
    deadline = time.monotonic() + CATCH_UP_SECONDS
    while reader.distinct < WARM_UP_EVENTS + generator.sent and time.monotonic() < deadline and serve.poll() is None:
        time.sleep(1)
    rss_end = serve.rss_mb()
    failed = serve.poll() is not None
    # SIGTERM to serve alone (see README, "Supervision"); the exit code stays None if it did not exit in time.
    exit_code = serve.poll() if failed else serve.terminate(120)
    reader.stop()
    lost = reader.missing(topic_ends(client_for(bootstrap), "events"))
    half = len(lags) // 2
    latency = reader.latency_ms(since=WARM_UP_EVENTS)
    return {
        "minutes": args.minutes,
        "rate": args.rate,
        "start_to_first_predictions_s": first_predictions_s,
        "events": generator.sent,
        "predictions": reader.distinct - WARM_UP_EVENTS,
        "duplicates": reader.duplicates,
        "dead_letters": reader.counts["predictions-dlq"],
        "lost": lost,
        "max_lag": max((lag for _, lag in lags), default=0),
        "final_lag": WARM_UP_EVENTS + generator.sent - reader.distinct,
        "max_lag_first_half": max((lag for _, lag in lags[:half]), default=0),
        "max_lag_second_half": max((lag for _, lag in lags[half:]), default=0),
        **latency_summary(latency),
        "latency_max_ms": round(float(np.max(latency)), 1) if len(latency) else None,
        "rss_start_mb": rss_start,
        "rss_end_mb": rss_end,
        "query_failures": int(failed),
        "serve_exit_code": exit_code,
    }


if __name__ == "__main__":
    main()
