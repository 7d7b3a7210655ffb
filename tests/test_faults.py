"""Crash safety proven from outside: ``benchmarks/faults.py`` with every kind of fault, as CI runs it.

serve runs under the benchmark's supervisor against its own Apache Kafka broker, with a backlog and a
live stream that runs on through the faults; the faults (serve's process tree SIGKILLed, an executor
Python worker SIGKILLed in a task, the broker stopped with SIGSTOP, the broker SIGKILLed or stopped and
started again on its data), at least one of each kind, hit it at seeded random moments, one at a time. Every
check is asserted here from the benchmark's JSON line, not only its ``ok``:

- every fault requested was injected (none skipped) and survived: an event produced after it ended got
  an outcome within the benchmark's recovery bound (``RECOVERY_S``);
- every worker kill landed in a task (``busy``): the task failed, so serve exited and was restarted; with
  the serve kills, serve restarted at least once per kill;
- the counts come from the output topics read to the ends they had after serve and the rest of its
  session exited: every event has a prediction or a dead letter, duplicates are byte-identical, every
  prediction equals ONNX Runtime's, dead letters are exactly the malformed events, and the final SIGTERM
  ended serve with 0.

The default run holds one case per delivery mode, each with four faults, one of every kind (the broker's
restart a SIGKILL): at-least-once with Spark's connector, and exactly-once (streamhydro's connector; Spark's
is refused by the config), where the outputs are read ``read_committed`` and there must be no duplicate at
all. Marked ``long`` (``-m long``, deselected by default to keep CI under 20 minutes): at-least-once with
streamhydro's connector, five faults, and exactly-once with eight, every kind twice: at least five kill -9
(two of serve's tree, two of a worker, one of the broker: it is SIGKILLed every other restart).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.spark, pytest.mark.broker, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
FAULT_KINDS = {"serve_kill", "worker_kill", "broker_stall", "broker_restart"}
EVENTS = 20_000
RECOVERY_S = 300  # benchmarks/faults.py's bound for serve to score an event produced after a fault
# Seconds per fault: Spark's and the broker's starts, each fault followed by recovery (a serve restart is
# ~20-40 s here), the catch-up, the read-back; well over what a run takes on the 2-core CI machine.
TIMEOUT_PER_FAULT_S = 300


@pytest.mark.parametrize(
    ("delivery", "source", "faults"),
    [
        ("at_least_once", "builtin", 4),
        ("exactly_once", "python", 4),
        pytest.param("at_least_once", "python", 5, marks=pytest.mark.long),
        pytest.param("exactly_once", "python", 8, marks=pytest.mark.long),
    ],
)
def test_no_event_is_lost_or_scored_wrong_under_faults(delivery, source, faults):
    command = [
        sys.executable, str(ROOT / "benchmarks" / "faults.py"),
        "--events", str(EVENTS), "--faults", str(faults), "--rate", "200", "--stall-seconds", "10", "--seed", "11",
        "--delivery", delivery, "--source", source,
    ]
    # The benchmark and the serve it starts import streamhydro from this checkout, whichever one is installed.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    # On a timeout subprocess.run SIGKILLs the benchmark; its broker and serve die with it (parent-death signal).
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_PER_FAULT_S * faults, check=False)
    context = f"stderr:\n{done.stderr[-6000:]}\nstdout:\n{done.stdout[-3000:]}"
    assert done.stdout.strip(), context
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(result))  # the benchmark's measurements, shown with -rP
    log = result["fault_log"]

    assert (result["delivery"], result["source"]) == (delivery, source), context
    # Every fault requested was injected, every kind, none skipped.
    assert result["faults_requested"] == faults and len(log) == faults, context
    assert result["faults_skipped"] == {}, context
    assert all(fault["injected"] for fault in log), context
    assert sum(result["faults"].values()) == faults, context
    assert set(result["faults"]) == FAULT_KINDS == {fault["kind"] for fault in log}, context
    assert min(result["faults"].values()) >= faults // 4, context
    # Every fault survived, the last one too.
    assert all(fault["survived"] and 0 <= fault["recovery_s"] <= RECOVERY_S for fault in log), context
    assert result["faults_survived"] == faults, context
    # Every worker kill landed in a task, which failed: serve exited and was restarted.
    worker_kills = [fault for fault in log if fault["kind"] == "worker_kill"]
    assert worker_kills and all(fault["busy"] and fault["kills"] >= 1 for fault in worker_kills), context
    assert result["serve_restarts"] >= result["faults"]["serve_kill"] + result["faults"]["worker_kill"], context
    # The counts are read after serve's whole session exited, to the output ends it left.
    assert result["final_exit_code"] == 0, context
    assert result["serve_processes_left"] == 0, context
    assert result["outputs_read_to_end"], context
    assert result["events"] == result["produced"] >= EVENTS, context
    assert result["lost"] == 0, context
    assert result["mismatches"] == 0, context
    assert result["unreadable_outputs"] == 0, context
    assert result["wrong_predictions"] == 0, context
    assert result["predictions_compared"] == result["events"] - result["bad_sent"], context
    assert result["unexpected_dead_letters"] == 0, context
    assert result["bad_sent"] > 0 and result["malformed"] == result["bad_sent"] == result["dead_letters"], context
    if delivery == "exactly_once":
        assert result["duplicates"] == 0, context
        assert result["output_records"] == result["events"], context
    assert result["ok"] and done.returncode == 0, context
