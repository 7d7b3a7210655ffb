"""Fault injection: ``streamhydro serve`` under a supervisor, crashed and starved at random moments, checked from outside.

    python benchmarks/faults.py --events 200000 --faults 20
    python benchmarks/faults.py --events 20000 --faults 5 --stall-seconds 10     # tests/test_faults.py
    python benchmarks/faults.py --events 20000 --faults 8 --delivery exactly_once --source python

An Apache Kafka broker runs with its data in a folder of its own, in its own process group. A backlog of
half the events is produced, ``serve`` starts as users run it (``python -m streamhydro serve --config
FILE``, its own session), and events are produced live at ``--rate`` until the last fault is survived and
at least the other half was sent; all carry a sprinkling of malformed records (``--bad-fraction``). No
earlier than seeded random moments of the live stream, ``--faults`` faults are injected one after the
other, cycling through ``--kinds`` (default all four, from a seeded first kind):

- ``serve_kill``: SIGKILL to every process group of serve's tree (serve and Spark's JVM; Spark's Python
  worker daemons and their workers), as a crash of the machine or container would;
- ``worker_kill``: SIGKILL to one executor Python worker (a process forked by Spark's Python worker daemon)
  *in a task*. Workers are looked at every ``BUSY_INTERVAL_S`` until one's main thread starts running
  (an idle worker's blocks on its socket until a task comes), with a burst of ``BURST_EVENTS`` events every ``BURST_EVERY_S`` giving tasks to catch; the kill
  counts only when the task failed because of it: ``local[N]`` Spark does not retry tasks, so the query
  fails and serve exits. A kill serve outlives (it hit a task's end) is followed by another, until
  ``WORKER_SEARCH_S``; then the fault is not injected;
- ``broker_stall``: the broker's process group stopped with SIGSTOP for ``--stall-seconds``, then SIGCONT;
- ``broker_restart``: the broker killed (SIGKILL; SIGTERM every other time) and started again on its data.

Each fault must be survived: an event produced after the fault ended gets an outcome within
``RECOVERY_S`` (its ``recovery_s``); the next fault comes only then, and a fault not survived ends the
injection. Like systemd's ``Restart=on-failure``, a supervisor (:mod:`streamhydro.harness.supervisor`) restarts
serve, with the same config and checkpoint, whenever it exits unasked. When every event has an outcome (or
a deadline passed), serve gets a final SIGTERM, which must end it with 0, and the rest of its session (the
JVM, the worker daemons and workers) must exit too.

Only then are the counts read (:mod:`streamhydro.harness.audit`): the output and dead-letter topics' end offsets
are taken, and they are read to those ends (``outputs_read_to_end``), so a record written late, a
duplicate included, is counted. Every event in the topic (as many as were produced) has a prediction or
a dead letter (``lost``: neither); records for the same event are byte-identical (``mismatches``); each
prediction equals ONNX Runtime run directly on the event (``wrong_predictions``); dead letters only for
the malformed events (``unexpected_dead_letters``; ``malformed`` by the payload rules must equal
``bad_sent``). With ``--delivery exactly_once`` the outputs are read ``read_committed`` and duplicates
must be 0. Progress lines go to stderr; the last line on stdout is JSON, with a record per fault
(``fault_log``: kind, detail, ``injected``, ``survived``, ``recovery_s``; for a worker kill ``busy`` and
its search: ``search_s``, ``rounds``, ``bursts``, ``kills``). The exit status is 1 when a check failed
(:func:`passed`; the work folder with serve's and the broker's logs is then kept).
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

from confluent_kafka import KafkaException

from streamhydro.harness.audit import OutcomeLedger, check_events
from streamhydro.brokers import ApacheKafkaBroker, BrokerConfig
from streamhydro.config import load
from streamhydro.errors import StreamhydroError
from streamhydro.kafka.admin import ensure_topics
from streamhydro.kafka.options import ClientConfig, client_for
from streamhydro.outputs import topic_ends
from streamhydro.producer import LoadGenerator
from streamhydro.registry import Registry
from streamhydro.harness.supervisor import ServeProcess, Supervisor, write_serve_config

FAULT_KINDS = ("serve_kill", "worker_kill", "broker_stall", "broker_restart")
PARTITIONS = 2
EVENTS, OUTPUT, DEAD_LETTERS = "events", "predictions", "predictions-dlq"
RESTART_DELAY_S = 2.0
RECOVERY_S = 300.0  # for serve to score an event produced after a fault ended
WORKER_SEARCH_S = 120.0  # for a worker kill to land in a task
BUSY_LOOKS, BUSY_INTERVAL_S = 50, 0.02  # a round of looks at the workers for one starting a task
BURST_EVENTS = 2000  # produced at once while a worker kill searches: micro-batches whose tasks last
BURST_EVERY_S = 5.0
TASK_FAILURE_S = 30.0  # for serve to exit after a worker was killed in a task
BROKER_DOWN_S = (1.0, 5.0)  # how long a restarted broker stays down, drawn from this range
CATCH_UP_S = 900.0  # after the last event was produced, for every event to have an outcome
FINAL_UP_S = 300.0  # for serve's query to run before the final SIGTERM
FINAL_STOP_S = 180.0  # for serve to exit after it
SESSION_END_S = 60.0  # for the rest of serve's session (the JVM, the worker daemons) to exit after serve
READ_BACK_S = 600.0  # for reading the outputs to their end and the events for the checks


class LiveStream:
    """A load generator producing at ``rate`` events per second in a thread, until :meth:`stop`."""

    def __init__(self, generator: LoadGenerator, rate: float) -> None:
        self.generator = generator
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(rate,), name="live-stream", daemon=True)

    def _run(self, rate: float) -> None:
        try:
            self.generator.run(None, rate, self._stop)
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
    """Injects one fault of a kind, and records it. ``burst()`` produces a burst of events at once."""

    def __init__(
        self, broker: ApacheKafkaBroker, serve: ServeProcess, supervisor: Supervisor, rng: random.Random, stall_s: float,
        burst: Callable[[], None],
    ) -> None:
        self.broker = broker
        self.serve = serve
        self.supervisor = supervisor
        self.rng = rng
        self.stall_s = stall_s
        self.burst = burst
        self.injected: Counter[str] = Counter()
        self.skipped: Counter[str] = Counter()

    def inject(self, kind: str) -> dict[str, Any]:
        """Inject one ``kind`` fault: its record (``kind``, ``injected``, ``detail``, and what the kind adds)."""
        done = getattr(self, f"_{kind}")()
        if done is None or not done[0]:
            self.skipped[kind] += 1
            return {"kind": kind, "injected": False, "detail": "not injected", **(done[1] if done else {})}
        self.injected[kind] += 1
        return {"kind": kind, "injected": True, "detail": done[0], **done[1]}

    def _serve_kill(self) -> tuple[str, dict[str, Any]] | None:
        pid = self.serve.pid
        groups = self.serve.kill()
        return (f"SIGKILL to serve pid {pid}'s process groups {groups}", {}) if groups else None

    def _worker_kill(self) -> tuple[str, dict[str, Any]]:
        """SIGKILL to an executor Python worker in a task, shown by its effect: in ``local[N]`` Spark does
        not retry a task, so the query fails and serve exits. Workers are looked at in rounds of
        ``BUSY_LOOKS`` looks ``BUSY_INTERVAL_S`` apart until one starts a task
        (:meth:`ServeProcess.busy_python_workers`), which is killed at once; a kill that serve outlives for
        ``TASK_FAILURE_S`` hit a task's end and the search goes on, with a burst of events every
        ``BURST_EVERY_S`` making tasks to catch, for up to ``WORKER_SEARCH_S``. The record says how long the
        search took, how many rounds of looks, bursts and kills; ``busy`` is False (and the kill not
        injected) when none landed."""
        started = time.monotonic()
        rounds = kills = bursts = 0
        burst_at = -BURST_EVERY_S
        while (elapsed := time.monotonic() - started) < WORKER_SEARCH_S:
            if not self.supervisor.wait_for(lambda: self.serve.running() and self.serve.query_started(), WORKER_SEARCH_S - elapsed):
                break
            if time.monotonic() - burst_at >= BURST_EVERY_S:
                self.burst()
                bursts += 1
                burst_at = time.monotonic()
            rounds += 1
            busy = self.serve.busy_python_workers(BUSY_LOOKS, BUSY_INTERVAL_S)
            if not busy:
                continue
            pid = self.rng.choice(busy)
            exits = Counter(self.supervisor.exits)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            kills += 1
            if self.supervisor.wait_for(lambda: self.supervisor.exits != exits, TASK_FAILURE_S):
                code = next(iter(self.supervisor.exits - exits))
                search = {"busy": True, "search_s": round(time.monotonic() - started, 2), "rounds": rounds, "bursts": bursts, "kills": kills}
                return f"SIGKILL to busy executor Python worker pid {pid}; serve exited {code}: {self.serve.error_line()}", search
        return "", {"busy": False, "search_s": round(time.monotonic() - started, 2), "rounds": rounds, "bursts": bursts, "kills": kills}

    def _broker_stall(self) -> tuple[str, dict[str, Any]]:
        self.broker.send_signal(signal.SIGSTOP)
        try:
            self.supervisor.idle(self.stall_s)
        finally:
            self.broker.send_signal(signal.SIGCONT)
        return f"broker pid {self.broker.pid} stopped (SIGSTOP) for {self.stall_s:.0f} s", {}

    def _broker_restart(self) -> tuple[str, dict[str, Any]]:
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
        return f"broker pid {pid} {'SIGKILLed' if hard else 'stopped (SIGTERM)'}, down {down_s:.1f} s, back in {time.monotonic() - started:.1f} s as pid {self.broker.pid}", {}


def progress(started: float, **fields: Any) -> None:
    print(json.dumps({"t_s": round(time.monotonic() - started, 1), **fields}), file=sys.stderr, flush=True)


def recovery_s(client: ClientConfig, ledger: OutcomeLedger, supervisor: Supervisor) -> float | None:
    """Seconds until an event produced after this moment (at or above the event topic's ends now) has an
    outcome: serve survived what came before. None if none had one within ``RECOVERY_S``. The ends are
    asked again, supervising meanwhile, while a broker just back does not give them."""
    started = time.monotonic()
    starts: dict[tuple[str, int], int] = {}

    def ends_known() -> bool:
        try:
            starts.update(topic_ends(client, EVENTS))
        except (StreamhydroError, KafkaException) as exc:
            logging.warning("end offsets of %s: %s; asking again", EVENTS, exc)
        return len(starts) == PARTITIONS

    if not supervisor.wait_for(ends_known, RECOVERY_S) or not supervisor.wait_for(lambda: ledger.recorded_from(starts) > 0, RECOVERY_S - (time.monotonic() - started)):
        return None
    return round(time.monotonic() - started, 1)


def inject_faults(
    kinds: tuple[str, ...], count: int, live_s: float, injector: FaultInjector, client: ClientConfig, ledger: OutcomeLedger, sent: Callable[[], int], started: float
) -> list[dict[str, Any]]:
    """Inject ``count`` faults, no earlier than seeded random moments of the next ``live_s`` seconds, ``kinds``
    cycling from a seeded first one, each once serve survived the previous one (:func:`recovery_s`).
    Returns a record per fault; stops after a fault serve did not survive."""
    live_started = time.monotonic()
    rng, supervisor = injector.rng, injector.supervisor
    first_kind = rng.randrange(len(kinds))
    records = []
    for n, moment in enumerate(sorted(rng.uniform(0, live_s) for _ in range(count))):
        kind = kinds[(first_kind + n) % len(kinds)]
        supervisor.idle(max(0.0, moment - (time.monotonic() - live_started)))
        record = {"n": n + 1, **injector.inject(kind)}
        record["recovery_s"] = recovery_s(client, ledger, supervisor) if record["injected"] else None
        record["survived"] = record["recovery_s"] is not None
        records.append(record)
        progress(started, **record, events=sent(), outcomes=ledger.distinct, serve_restarts=supervisor.restarts)
        if record["injected"] and not record["survived"]:
            break
    return records


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
        live = LiveStream(generators[-1], args.rate)
        live.start()
        burst = LoadGenerator(client, EVENTS, model.manifest, bad_fraction=args.bad_fraction, seed=args.seed + 2)
        generators.append(burst)
        injector = FaultInjector(broker, serve, supervisor, rng, args.stall_seconds, lambda: burst.run(burst.sent + BURST_EVENTS, None, threading.Event()))
        fault_log = inject_faults(args.kinds, args.faults, live_events / args.rate, injector, client, ledger, lambda: sum(g.sent for g in generators), started)
        # The live stream runs through the faults, and at least until it sent its half of --events.
        supervisor.wait_for(lambda: live.generator.sent >= live_events or live.done(), live_events / args.rate + CATCH_UP_S)
        live.stop()
        if live.error is not None:
            raise live.error
        ends = topic_ends(client, EVENTS)
        total = sum(ends.values())
        progress(started, produced=sum(g.sent for g in generators), in_topic=total, outcomes=ledger.recorded(ends))
        complete = supervisor.wait_for(lambda: ledger.recorded(ends) >= total, CATCH_UP_S)
        progress(started, complete=complete, outcomes=ledger.recorded(ends), serve_restarts=supervisor.restarts)
        final_exit_code = supervisor.stop(FINAL_UP_S, FINAL_STOP_S)
        left = serve.wait_session_ended(SESSION_END_S) if final_exit_code is not None else serve.session_processes()

        # Every count below is read after serve's processes are gone, to the output ends they left.
        ledger.stop()
        output_ends = {**topic_ends(client, OUTPUT), **topic_ends(client, DEAD_LETTERS)}
        read_to_end = ledger.catch_up(output_ends, READ_BACK_S)
        progress(started, final_exit_code=final_exit_code, serve_processes_left=len(left), output_ends=sum(output_ends.values()), read_to_end=read_to_end)
        # Scores are held to the tolerance of the service's own inference.allow_tf32.
        check = check_events(client, EVENTS, ends, ledger, model, READ_BACK_S, load(serve.config).inference.allow_tf32)
        bad_sent = sum(sum(g.bad.values()) for g in generators)
        result = {
            "events": total,
            "produced": sum(g.sent for g in generators),
            "faults_requested": args.faults,
            "faults": dict(injector.injected),
            "faults_skipped": dict(injector.skipped),
            "faults_survived": sum(record["survived"] for record in fault_log),
            "fault_log": fault_log,
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
            "output_records": ledger.records,
            "serve_processes_left": len(left),
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
    """Whether every check holds: every fault requested injected (a worker kill only when it landed in a
    task) and survived; serve restarted after each kill; the outputs read to the ends they had after serve's
    processes were gone; every event produced in the topic; nothing lost, duplicates identical, predictions
    right, dead letters for the malformed events only, a clean final stop; and no duplicate at all with
    exactly-once delivery."""
    faults = result["fault_log"]
    return (
        len(faults) == result["faults_requested"]
        and not result["faults_skipped"]
        and all(f["injected"] and f["survived"] for f in faults)
        and all(f["busy"] for f in faults if f["kind"] == "worker_kill")
        and result["serve_restarts"] >= result["faults"].get("serve_kill", 0) + result["faults"].get("worker_kill", 0)
        and result["outputs_read_to_end"]
        and result["serve_processes_left"] == 0
        and result["events"] == result["produced"]
        and result["lost"] == 0
        and result["mismatches"] == 0
        and result["wrong_predictions"] == 0
        and result["unexpected_dead_letters"] == 0
        and result["unreadable_outputs"] == 0
        and result["malformed"] == result["bad_sent"] == result["dead_letters"]
        and result["final_exit_code"] == 0
        and (result["delivery"] != "exactly_once" or result["duplicates"] == 0)
    )


def fault_kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(kind.strip() for kind in text.split(",") if kind.strip())
    unknown = sorted(set(kinds) - set(FAULT_KINDS))
    if not kinds or unknown:
        raise argparse.ArgumentTypeError(f"unknown fault kinds {unknown}: choose from {', '.join(FAULT_KINDS)}")
    return kinds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200_000, help="events to produce at least: half as a backlog, half live; the live stream runs on through the faults (default %(default)s)")
    parser.add_argument("--faults", type=int, default=20, help="faults to inject (default %(default)s)")
    parser.add_argument("--kinds", type=fault_kinds, default=FAULT_KINDS, help=f"the fault kinds to cycle through, comma-separated (default {','.join(FAULT_KINDS)})")
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
