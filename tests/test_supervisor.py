"""How the fault benchmark's supervisor tells a Python worker starting a task from an idle or a finishing one,
on real processes.

An idle worker's main thread blocks reading its socket while its other threads (ONNX Runtime's pool,
librdkafka's) may still run; a task starts when the JVM writes to that socket, and the main thread runs;
after the task the main thread runs on for a while (PySpark's ``gc.collect()``) while Spark already counts
the worker idle. :func:`starting_main_threads` must report only the blocked main thread that starts running.
"""

from __future__ import annotations

import subprocess
import sys
import threading

from streamhydro.harness.supervisor import starting_main_threads

# The main thread runs all along, as after a task.
SPINNING = "print('ready', flush=True)\nwhile True:\n    pass\n"
# The main thread blocks reading stdin, as an idle worker blocks reading its socket; another thread spins.
IDLE = (
    "import sys, threading\n"
    "threading.Thread(target=lambda: [None for _ in iter(int, 1)], daemon=True).start()\n"
    "print('ready', flush=True)\n"
    "sys.stdin.read()\n"
)
# The main thread blocks reading stdin until a line (a task) comes, then runs.
WAITING = "import sys\nprint('ready', flush=True)\nsys.stdin.readline()\nwhile True:\n    pass\n"


def _started(code: str) -> subprocess.Popen[str]:
    process = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline() == "ready\n"
    return process


def test_only_a_blocked_main_thread_that_starts_running_counts_as_starting():
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    spinning, idle, waiting = _started(SPINNING), _started(IDLE), _started(WAITING)
    pids = [spinning.pid, idle.pid, waiting.pid, ended.pid]

    def send_a_task() -> None:
        waiting.stdin.write("task\n")
        waiting.stdin.flush()

    try:
        assert starting_main_threads(pids, intervals=4, interval_s=0.05) == []
        task = threading.Timer(0.3, send_a_task)
        task.start()
        assert starting_main_threads(pids, intervals=40, interval_s=0.05) == [waiting.pid]
        task.join()
    finally:
        for process in (spinning, idle, waiting):
            process.kill()
            process.wait()
