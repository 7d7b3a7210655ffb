"""A crashed exactly-once task's pending mark, and what fencing at start does about it; no Spark.

    python benchmarks/transaction_restarts.py [--rounds 25] [--seed 1] [--no-fence]

One Apache Kafka broker with its data in a folder of its own; a backlog of demo events in two partitions,
and more produced live. Two processes, one per input partition, do what serve's tasks do with
``delivery = "exactly_once"``: each loops over the partition's next offset range (at most ``RANGE`` records)
through :func:`streamhydro.executor.direct.score_range` (read, score, write in bounded transactions, each
marked in the consumer group). Each round: the broker is killed (SIGKILL and SIGTERM in turn) and started
again on its data, then both task processes are SIGKILLed at a seeded moment up to ``KILL_WITHIN_S`` after
the broker is back (as serve's exit kills its Python workers), and after ``RESTART_DELAY_S`` the marks are
read as serve's start reads them: first :func:`streamhydro.kafka.transactions.fence` of the two
transactional ids (skipped with ``--no-fence``), then a stable read of the group (``isolation.level =
read_committed``: it waits for pending transactional offsets), asked again every 30 s for up to
``READ_LIMIT_S``. ``stable_read_s`` is how long that took. A task killed between sending its mark and
committing leaves the mark pending until its transaction ends: at once when fenced, else when the broker's
transaction timeout (``transaction.timeout.ms``, 120 s by default) aborts it.

Prints a line per round on stderr and one JSON object (last line): every round, the largest and median
``stable_read_s``, and how many rounds waited longer than 10 s.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from confluent_kafka import Consumer, KafkaException, TopicPartition

from streamhydro.brokers import ApacheKafkaBroker, BrokerConfig
from streamhydro.kafka.admin import ensure_topics
from streamhydro.kafka.options import client_for
from streamhydro.kafka.transactions import fence, marks_config
from streamhydro.producer import LoadGenerator
from streamhydro.registry import Registry

PREFIX = "streamhydro-restarts"
EVENTS, OUTPUT = "events", "predictions"
PARTITIONS = (0, 1)
BACKLOG, LIVE_EVENTS, LIVE_EVERY_S = 20_000, 400, 0.5
RANGE = 3000
BETWEEN_ROUNDS_S = (4.0, 10.0)
BROKER_DOWN_S = (1.0, 4.0)
KILL_WITHIN_S = 4.0
RESTART_DELAY_S = 2.0
READ_TIMEOUT_S = 30.0
READ_LIMIT_S = 200.0
SLOW_S = 10.0


def task(bootstrap: str, registry: str, model_name: str, partition: int, state: Path) -> None:
    """One task process: the partition's ranges in turn, each until written (a failed range is tried
    again, same batch id and bounds, as Spark's retry would). ``state`` keeps the range across kills."""
    from streamhydro.config import PayloadSettings
    from streamhydro.executor.direct import RangeIO, score_range
    from streamhydro.executor.engine import EngineSettings
    from streamhydro.executor.scoring import ScoringPlan
    from streamhydro.executor.sessions import TaskResources
    from streamhydro.kafka.offsets import EndOffsetProbe
    from streamhydro.kafka.planning import OffsetRange

    model = Registry(registry).get(model_name, "promoted")
    plan = ScoringPlan(
        model.manifest, SimpleNamespace(value=model.read_bytes()), PayloadSettings(), OUTPUT, f"{OUTPUT}-dlq",
        EngineSettings(providers=("CPUExecutionProvider",), batch_size=2000, pipeline_depth=0, intra_op_threads=1),
    )
    probe = EndOffsetProbe(client_for(bootstrap))  # the planner's, as serve's source keeps one; it waits out a broker restart
    while True:
        at = json.loads(state.read_text()) if state.exists() else {"from": 0, "batch": 0, "until": None}
        if at["until"] is None:
            end = probe.list_offsets([(EVENTS, partition)])[(EVENTS, partition)][1]
            if end <= at["from"]:
                time.sleep(0.2)
                continue
            at["until"] = min(end, at["from"] + RANGE)
            state.write_text(json.dumps(at))
        io = RangeIO(client_for(bootstrap), transactional_id_prefix=PREFIX, batch_id=at["batch"])
        try:
            score_range(plan, io, OffsetRange(EVENTS, partition, at["from"], at["until"]), TaskResources())
        except Exception as exc:  # noqa: BLE001 -- Spark's retry
            print(f"task {partition}: range [{at['from']}, {at['until']}) failed: {exc}; trying again", file=sys.stderr, flush=True)
            time.sleep(0.5)
            continue
        state.write_text(json.dumps({"from": at["until"], "batch": at["batch"] + 1, "until": None}))


def stable_read_s(bootstrap: str, fenced: bool) -> float | None:
    """Seconds until a stable read of the marks group answers (after fencing, unless ``fenced`` is False);
    None past ``READ_LIMIT_S``."""
    started = time.monotonic()
    if fenced:
        fence(client_for(bootstrap), PREFIX, [(EVENTS, p) for p in PARTITIONS])
    while time.monotonic() - started < READ_LIMIT_S:
        consumer = Consumer(marks_config(client_for(bootstrap), PREFIX).as_dict())
        try:
            consumer.committed([TopicPartition(EVENTS, p) for p in PARTITIONS], timeout=READ_TIMEOUT_S)
            return round(time.monotonic() - started, 2)
        except KafkaException as exc:
            print(f"  stable read: {exc.args[0].str()} after {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
        finally:
            consumer.close()
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-fence", action="store_true", help="read the marks without fencing first (as serve did before)")
    parser.add_argument("--registry", default="models")
    parser.add_argument("--model", default="breast_cancer")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="streamhydro-restarts-"))
    broker = ApacheKafkaBroker(config=BrokerConfig(log_dir=str(work)), data_dir=work / "kafka")
    context = multiprocessing.get_context("spawn")
    tasks: list[Any] = []
    stop_live = threading.Event()
    rounds: list[dict[str, Any]] = []
    try:
        broker.start()
        bootstrap = broker.bootstrap_servers
        ensure_topics(client_for(bootstrap), {EVENTS: len(PARTITIONS), OUTPUT: len(PARTITIONS), f"{OUTPUT}-dlq": 1})
        model = Registry(args.registry).get(args.model, "promoted")
        generator = LoadGenerator(client_for(bootstrap), EVENTS, model.manifest, seed=args.seed)
        generator.run(BACKLOG, None, threading.Event())

        def live() -> None:
            while not stop_live.wait(LIVE_EVERY_S):
                try:
                    generator.run(generator.sent + LIVE_EVENTS, None, threading.Event())
                except Exception:  # noqa: BLE001 -- the broker is down; go on
                    pass

        threading.Thread(target=live, daemon=True).start()

        def start_tasks() -> list[Any]:
            started = [
                context.Process(target=task, args=(bootstrap, args.registry, args.model, p, work / f"task-{p}.json"), daemon=True)
                for p in PARTITIONS
            ]
            for process in started:
                process.start()
            return started

        tasks = start_tasks()
        for n in range(args.rounds):
            time.sleep(rng.uniform(*BETWEEN_ROUNDS_S))
            hard = n % 2 == 0
            broker.kill() if hard else broker.stop()
            time.sleep(rng.uniform(*BROKER_DOWN_S))
            broker.start()
            kill_after = rng.uniform(0, KILL_WITHIN_S)
            time.sleep(kill_after)
            for process in tasks:
                os.kill(process.pid, signal.SIGKILL)
                process.join()
            time.sleep(RESTART_DELAY_S)
            took = stable_read_s(bootstrap, fenced=not args.no_fence)
            rounds.append({"round": n + 1, "broker": "SIGKILL" if hard else "SIGTERM", "tasks_killed_after_s": round(kill_after, 2), "stable_read_s": took})
            print(json.dumps(rounds[-1]), file=sys.stderr, flush=True)
            if took is None:
                break
            tasks = start_tasks()
    finally:
        stop_live.set()
        for process in tasks:
            if process.is_alive():
                os.kill(process.pid, signal.SIGKILL)
        broker.stop()
    reads = [r["stable_read_s"] for r in rounds if r["stable_read_s"] is not None]
    result = {
        "fenced": not args.no_fence,
        "seed": args.seed,
        "rounds": len(rounds),
        "unanswered": sum(r["stable_read_s"] is None for r in rounds),
        "stable_read_max_s": max(reads, default=None),
        "stable_read_median_s": statistics.median(reads) if reads else None,
        f"rounds_over_{SLOW_S:.0f}_s": sum(1 for r in reads if r > SLOW_S),
        "round_log": rounds,
    }
    if result["unanswered"]:
        result["work"] = str(work)  # the broker's data and log, kept
        print(f"work folder kept: {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
