"""Fault injection: ``streamhydro serve`` under a supervisor, crashed and starved at random moments, checked from outside.

    python benchmarks/faults.py --events 200000 --faults 20
    python benchmarks/faults.py --events 20000 --faults 5 --stall-seconds 10     # tests/test_faults.py
    python benchmarks/faults.py --events 20000 --faults 4 --delivery exactly_once

An Apache Kafka broker runs with its data in a folder of its own, in its own process group. A backlog of
half the events is produced, ``serve`` starts as users run it (``python -m streamhydro serve --config
FILE``, its own session), and the other half is produced live at ``--rate``; both carry a sprinkling of
malformed records (``--bad-fraction``). At seeded random moments of the live stream, ``--faults`` faults
are injected one after the other, cycling through (from a seeded first kind):

- ``serve_kill``: SIGKILL to every process group of serve's tree (serve and Spark's JVM; Spark's Python
  worker daemons and their workers), as a crash of the machine or container would;
- ``worker_kill``: SIGKILL to one executor Python worker (a process forked by Spark's Python worker daemon),
  one that is running a task (its main thread running) when there is one within a minute;
- ``broker_stall``: the broker's process group stopped with SIGSTOP for ``--stall-seconds``, then SIGCONT;
- ``broker_restart``: the broker killed (SIGKILL; SIGTERM every other time) and started again on its data.

A fault waits until the previous one is over and serve has scored new events since, so each one hits a
working service. Like systemd's ``Restart=on-failure``, a supervisor (:mod:`streamhydro.supervisor`)
restarts serve, with the same config and checkpoint, whenever it exits unasked. When every event is
produced and has an outcome (or a deadline passed), serve gets a final SIGTERM, which must end it with 0.

Then the topics are checked from outside (:mod:`streamhydro.audit`): every event has a prediction or a
dead letter (``lost``: neither); records for the same event are byte-identical (``mismatches``); each
prediction equals ONNX Runtime run directly on the event (``wrong_predictions``); dead letters only for
the malformed events (``unexpected_dead_letters``; ``malformed`` by the payload rules must equal
``bad_sent``). With ``--delivery exactly_once`` the outputs are read ``read_committed`` and duplicates
must be 0. Progress lines go to stderr; the last line on stdout is JSON, and the exit status is 1 when a
check failed (the work folder with serve's and the broker's logs is then kept).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from streamhydro.audit import OutcomeLedger, check_events
from streamhydro.brokers import ApacheKafkaBroker, BrokerConfig
from streamhydro.config import load
from streamhydro.kafka.admin import ensure_topics
from streamhydro.kafka.options import client_for
from streamhydro.outputs import topic_ends
from streamhydro.producer import LoadGenerator
from streamhydro.registry import Registry
from streamhydro.supervisor import ServeProcess, Supervisor, write_serve_config

FAULT_KINDS = ("serve_kill", "worker_kill", "broker_stall", "broker_restart")
PARTITIONS = 2
EVENTS, OUTPUT, DEAD_LETTERS = "events", "predictions", "predictions-dlq"
RESTART_DELAY_S = 2.0
RECOVERY_S = 300.0  # for serve to score new events after a fault
WORKER_WAIT_S = 60.0  # for an executor Python worker to be running a task
BROKER_DOWN_S = (1.0, 5.0)  # how long a restarted broker stays down, drawn from this range
CATCH_UP_S = 900.0  # after the last event was produced, for every event to have an outcome
FINAL_UP_S = 300.0  # for serve's query to run before the final SIGTERM
FINAL_STOP_S = 180.0  # for serve to exit after it
READ_BACK_S = 600.0  # for reading the outputs to their end and the events for the checks


class LiveStream:
    """A load generator producing ``count`` events at ``rate`` per second in a thread."""

    def __init__(self, generator: LoadGenerator, count: int, rate: float) -> None:
        self.generator = generator
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(count, rate), name="live-stream", daemon=True)

    def _run(self, count: int, rate: float) -> None:
        try:
            self.generator.run(count, rate, self._stop)
        except Exception as exc:  # noqa: BLE001 -- reported by the main thread after the join
            self.error = exc

    def start(self) -> None:
        self._thread.start()

    def done(self) -> bool:
        return not self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class FaultInjector:
    """Injects one fault of a kind, and records it."""

    def __init__(self, broker: ApacheKafkaBroker, serve: ServeProcess, supervisor: Supervisor, rng: random.Random, stall_s: float) -> None:
        self.broker = broker
        self.serve = serve
        self.supervisor = supervisor
        self.rng = rng
        self.stall_s = stall_s
        self.injected: Counter[str] = Counter()
        self.skipped: Counter[str] = Counter()

    def inject(self, kind: str) -> str:
        """Inject one ``kind`` fault; a line saying what was done."""
        detail = getattr(self, f"_{kind}")()
        if detail is None:
            self.skipped[kind] += 1
            return "skipped"
        self.injected[kind] += 1
        return detail

    def _serve_kill(self) -> str:
        pid = self.serve.pid
        return f"SIGKILL to serve pid {pid}'s process groups {self.serve.kill()}"

    def _worker_kill(self) -> str | None:
        """A worker running a task when there is one within ``WORKER_WAIT_S``, else an idle one."""
        busy: list[int] = []

        def found_busy() -> bool:
            busy[:] = self.serve.busy_python_workers()
            return bool(busy)

        self.supervisor.wait_for(found_busy, WORKER_WAIT_S)
        candidates = busy or self.serve.python_workers()
        if not candidates:
            return None
        pid = self.rng.choice(candidates)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return None
        return f"SIGKILL to {'busy' if busy else 'idle'} executor Python worker pid {pid}"

    def _broker_stall(self) -> str:
        self.broker.send_signal(signal.SIGSTOP)
        try:
            self.supervisor.idle(self.stall_s)
        finally:
            self.broker.send_signal(signal.SIGCONT)
        return f"broker pid {self.broker.pid} stopped (SIGSTOP) for {self.stall_s:.0f} s"

    def _broker_restart(self) -> str:
        hard = self.injected["broker_restart"] % 2 == 0
        pid = self.broker.pid
        if hard:
            self.broker.kill()
        else:
            self.broker.stop()
        down_s = self.rng.uniform(*BROKER_DOWN_S)
        self.supervisor.idle(down_s)
        started = time.monotonic()
        self.broker.start()
        return f"broker pid {pid} {'SIGKILLed' if hard else 'stopped (SIGTERM)'}, down {down_s:.1f} s, back in {time.monotonic() - started:.1f} s as pid {self.broker.pid}"


def progress(started: float, **fields: Any) -> None:
    print(json.dumps({"t_s": round(time.monotonic() - started, 1), **fields}), file=sys.stderr, flush=True)


def inject_faults(count: int, live_s: float, injector: FaultInjector, ledger: OutcomeLedger, sent: Callable[[], int], started: float) -> int:
    """Inject ``count`` faults at seeded random moments of the next ``live_s`` seconds, kinds cycling from a
    seeded first one; each waits until serve has scored new events since the previous one (or every event
    sent so far). Returns how many found serve not recovered within ``RECOVERY_S``."""
    live_started = time.monotonic()
    rng, supervisor, serve = injector.rng, injector.supervisor, injector.serve
    first_kind = rng.randrange(len(FAULT_KINDS))
    unrecovered = 0
    for n, moment in enumerate(sorted(rng.uniform(0, live_s) for _ in range(count))):
        kind = FAULT_KINDS[(first_kind + n) % len(FAULT_KINDS)]
        before = ledger.distinct
        if not supervisor.wait_for(lambda before=before: serve.query_started() and (ledger.distinct > before or ledger.distinct >= sent()), RECOVERY_S):
            unrecovered += 1
            progress(started, warning=f"serve scored nothing new within {RECOVERY_S:.0f} s before fault {n + 1}")
        supervisor.idle(max(0.0, moment - (time.monotonic() - live_started)))
        detail = injector.inject(kind)
        progress(started, fault=n + 1, kind=kind, detail=detail, events=sent(), outcomes=ledger.distinct, serve_restarts=supervisor.restarts)
    return unrecovered


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    started = time.monotonic()
    rng = random.Random(args.seed)
    model = Registry(args.registry).get(args.model, "promoted")
    broker = ApacheKafkaBroker(config=BrokerConfig(log_dir=str(work)), data_dir=work / "kafka")
    serve = ServeProcess(work / "serve.toml", work / "serve.log")
    generators: list[LoadGenerator] = []
    live: LiveStream | None = None
    ledger: OutcomeLedger | None = None
    try:
        broker.start()
        bootstrap = broker.bootstrap_servers
        client = client_for(bootstrap)
        ensure_topics(client, {EVENTS: PARTITIONS, OUTPUT: PARTITIONS, DEAD_LETTERS: 1})
        delivery = {"delivery": args.delivery} if args.delivery == "exactly_once" else {}
        write_serve_config(serve.config, work, bootstrap, kafka={"source": args.source, **delivery})
        backlog_events = args.events // 2
        backlog = LoadGenerator(client, EVENTS, model.manifest, bad_fraction=args.bad_fraction, seed=args.seed)
        generators.append(backlog)
        backlog.run(backlog_events, None, threading.Event())
        progress(started, backlog=backlog.sent)

        ledger = OutcomeLedger(client, OUTPUT, DEAD_LETTERS, model.manifest.labels, read_committed=args.delivery == "exactly_once")
        ledger.start()
        supervisor = Supervisor(serve, restart_delay_s=RESTART_DELAY_S)
        supervisor.start()
        progress(started, serve="query started", pid=serve.pid)

        live_events = args.events - backlog_events
        generators.append(LoadGenerator(client_for(bootstrap, {"linger.ms": "1"}), EVENTS, model.manifest, bad_fraction=args.bad_fraction, seed=args.seed + 1))
        live = LiveStream(generators[-1], live_events, args.rate)
        live.start()
        injector = FaultInjector(broker, serve, supervisor, rng, args.stall_seconds)
        unrecovered = inject_faults(args.faults, live_events / args.rate, injector, ledger, lambda: sum(g.sent for g in generators), started)
        supervisor.wait_for(live.done, live_events / args.rate + CATCH_UP_S)
        live.stop()
        if live.error is not None:
            raise live.error
        ends = topic_ends(client, EVENTS)
        total = sum(ends.values())
        progress(started, produced=sum(g.sent for g in generators), in_topic=total, outcomes=ledger.recorded(ends))
        complete = supervisor.wait_for(lambda: ledger.recorded(ends) >= total, CATCH_UP_S)
        progress(started, complete=complete, outcomes=ledger.recorded(ends), serve_restarts=supervisor.restarts)
        final_exit_code = supervisor.stop(FINAL_UP_S, FINAL_STOP_S)

        ledger.stop()
        read_to_end = ledger.catch_up(idle_s=5.0, timeout_s=READ_BACK_S)
        # Scores are held to the tolerance of the service's own inference.allow_tf32.
        check = check_events(client, EVENTS, ends, ledger, model, READ_BACK_S, load(serve.config).inference.allow_tf32)
        bad_sent = sum(sum(g.bad.values()) for g in generators)
        result = {
            "events": total,
            "faults": dict(injector.injected),
            "faults_skipped": dict(injector.skipped),
            "lost": total - ledger.recorded(ends),
            "duplicates": ledger.duplicates,
            "mismatches": ledger.mismatches,
            "wrong_predictions": check.wrong_predictions,
            "unexpected_dead_letters": check.unexpected_dead_letters,
            "dead_letters": sum(ledger.dead_letter_classes.values()),
            "dead_letter_classes": dict(ledger.dead_letter_classes),
            "bad_sent": bad_sent,
            "malformed": check.malformed,
            "predictions_compared": check.compared,
            "unreadable_outputs": ledger.unreadable,
            "outputs_read_to_end": read_to_end,
            "unrecovered_faults": unrecovered,
            "serve_restarts": supervisor.restarts,
            "serve_exits": {str(code): count for code, count in sorted(supervisor.exits.items())},
            "final_exit_code": final_exit_code,
            "delivery": args.delivery,
            "source": args.source,
            "seed": args.seed,
            "seconds": round(time.monotonic() - started, 1),
        }
        result["ok"] = passed(result)
        return result
    finally:
        if live is not None:
            live.stop()
        for generator in generators:
            generator.close()
        serve.kill()
        if ledger is not None:
            ledger.close()
        broker.stop()


def passed(result: dict[str, Any]) -> bool:
    """Whether every check holds: nothing lost, duplicates identical, predictions right, dead letters for the
    malformed events only, a clean final stop; and no duplicate at all with exactly-once delivery."""
    return (
        result["lost"] == 0
        and result["mismatches"] == 0
        and result["wrong_predictions"] == 0
        and result["unexpected_dead_letters"] == 0
        and result["unreadable_outputs"] == 0
        and result["malformed"] == result["bad_sent"] == result["dead_letters"]
        and result["final_exit_code"] == 0
        and (result["delivery"] != "exactly_once" or result["duplicates"] == 0)
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200_000, help="events to produce, half as a backlog, half live (default %(default)s)")
    parser.add_argument("--faults", type=int, default=20, help="faults to inject (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the fault moments, the workers picked and the events (default %(default)s)")
    parser.add_argument("--rate", type=float, default=100.0, help="live events per second (default %(default)s)")
    parser.add_argument("--delivery", choices=("at_least_once", "exactly_once"), default="at_least_once")
    parser.add_argument("--source", choices=("builtin", "python"), default="builtin", help="kafka.source (default %(default)s; exactly_once needs python)")
    parser.add_argument("--stall-seconds", type=float, default=30.0, help="how long a broker_stall keeps the broker stopped (default %(default)s)")
    parser.add_argument("--bad-fraction", type=float, default=0.002, help="fraction of malformed events (default %(default)s)")
    parser.add_argument("--registry", default="models")
    parser.add_argument("--model", default="breast_cancer")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, broker data) even when every check passed")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="streamhydro-faults-"))
    result: dict[str, Any] = {"ok": False}
    try:
        result = run(args, work)
    finally:
        if result["ok"] and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work folder kept: {work} (serve.log, the broker's log)", file=sys.stderr)
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
