"""Crash safety proven from outside: ``benchmarks/faults.py`` with every kind of fault, as CI runs it.

serve runs under the benchmark's supervisor against its own Apache Kafka broker, with a backlog and a
live stream; five faults, at least one of each kind (serve's process tree SIGKILLed, an executor Python
worker SIGKILLed, the broker stopped with SIGSTOP, the broker SIGKILLed and restarted on its data), hit it
at seeded random moments. The benchmark's JSON line must show every event with a prediction or a dead letter, duplicates
byte-identical, every prediction equal to ONNX Runtime's, dead letters for exactly the malformed events,
and a final SIGTERM that ends serve with 0.

With ``kafka.delivery = "exactly_once"`` the outputs are read ``read_committed`` and there must be no
duplicate at all; eight faults, every kind twice, make at least five kill -9 (two of serve's tree, two of
a worker, one of the broker: it is SIGKILLed every other restart).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.spark, pytest.mark.broker, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
# Seconds per fault: Spark's and the broker's starts, each fault followed by recovery (a serve restart is
# ~20-40 s here), the catch-up, the read-back; well over what a run takes on the 2-core CI machine.
TIMEOUT_PER_FAULT_S = 300


@pytest.mark.parametrize(("delivery", "faults"), [("at_least_once", 5), ("exactly_once", 8)])
def test_no_event_is_lost_or_scored_wrong_under_faults(delivery, faults):
    command = [
        sys.executable, str(ROOT / "benchmarks" / "faults.py"),
        "--events", "20000", "--faults", str(faults), "--rate", "100", "--stall-seconds", "10", "--seed", "11",
        "--delivery", delivery, "--source", "python" if delivery == "exactly_once" else "builtin",
    ]
    # On a timeout subprocess.run SIGKILLs the benchmark; its broker and serve die with it (parent-death signal).
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_PER_FAULT_S * faults, check=False)
    context = f"stderr:\n{done.stderr[-6000:]}\nstdout:\n{done.stdout[-2000:]}"
    assert done.stdout.strip(), context
    result = json.loads(done.stdout.strip().splitlines()[-1])

    assert sum(result["faults"].values()) == faults, context
    assert set(result["faults"]) == {"serve_kill", "worker_kill", "broker_stall", "broker_restart"}, context
    assert min(result["faults"].values()) >= faults // 4, context
    assert result["serve_restarts"] >= result["faults"]["serve_kill"], "each serve_kill needs a restart"
    assert result["events"] == 20000
    assert result["lost"] == 0, context
    assert result["mismatches"] == 0, context
    assert result["wrong_predictions"] == 0, context
    assert result["predictions_compared"] == result["events"] - result["bad_sent"], context
    assert result["unexpected_dead_letters"] == 0, context
    assert result["bad_sent"] > 0 and result["malformed"] == result["bad_sent"] == result["dead_letters"], context
    assert result["final_exit_code"] == 0, context
    assert result["delivery"] == delivery and (delivery != "exactly_once" or result["duplicates"] == 0), context
    assert result["ok"] and done.returncode == 0, context
