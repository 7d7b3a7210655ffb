"""How the fault benchmark's supervisor tells a Python worker in a task from an idle one, on real processes.

A worker in a task runs its main thread; an idle one blocks reading its socket while its other threads
(ONNX Runtime's pool, librdkafka's) may still run. :func:`running_main_threads` must tell them apart by the
main thread alone; a process that has ended is not running.
"""

from __future__ import annotations

import subprocess
import sys

from streamhydro.supervisor import running_main_threads

SPINNING = "print('ready', flush=True)\nwhile True:\n    pass\n"
# The main thread blocks reading stdin, as an idle worker blocks reading its socket; another thread spins.
BLOCKED = (
    "import sys, threading\n"
    "threading.Thread(target=lambda: [None for _ in iter(int, 1)], daemon=True).start()\n"
    "print('ready', flush=True)\n"
    "sys.stdin.read()\n"
)


def _started(code: str) -> subprocess.Popen[str]:
    process = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline() == "ready\n"
    return process


def test_only_a_process_whose_main_thread_runs_counts_as_running():
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    spinning, blocked = _started(SPINNING), _started(BLOCKED)
    try:
        assert running_main_threads([spinning.pid, blocked.pid, ended.pid], samples=3, interval_s=0.1) == [spinning.pid]
    finally:
        for process in (spinning, blocked):
            process.kill()
            process.wait()
