"""``streamhydro serve`` as a child process, watched and restarted the way a supervisor does it.

Runs in a client process (benchmarks, tests), on the machine that runs ``serve``. Linux only (/proc).

:class:`ServeProcess` starts ``python -m streamhydro serve --config FILE`` as users run it, in its own
session, with its output appended to one log file across restarts. Its process tree is serve (the
Python driver), Spark's JVM (serve's child, same process group) and Spark's Python worker daemons (the
JVM's children, each in a process group of its own, with the forked executor Python workers under them):

- :meth:`ServeProcess.terminate` sends SIGTERM to serve's pid alone, as systemd's ``KillMode=mixed`` and
  Kubernetes do: serve stops between micro-batches and exits 0. A SIGTERM to the whole group would also
  reach the JVM, whose shutdown hook stops the SparkContext under the running query.
- :meth:`ServeProcess.kill` SIGKILLs every process group of the tree, as a crash of the machine or the
  container would; it is also the cleanup that leaves nothing behind.
- serve gets ``PR_SET_PDEATHSIG``: should the parent die without cleaning up, the kernel kills serve, its
  JVM then exits (its stdin closes) and the worker daemons after it.
- The whole tree stays in serve's session: :meth:`ServeProcess.wait_session_ended` waits, after serve
  exited, until nothing of it is left (no worker can write any more).
- :meth:`ServeProcess.busy_python_workers` finds an executor Python worker starting a task: its main
  thread's CPU time (``/proc/PID/task/PID/schedstat``), which an idle worker's does not gain, starts
  growing.

:class:`Supervisor` restarts serve when it exits without being asked to, after a delay, like systemd's
``Restart=on-failure`` with ``RestartSec``; it gives up when serve has not started its query for
``give_up_s`` (systemd's start limit). It is polled, from the thread that started serve (the parent-death
signal is tied to that thread): :meth:`Supervisor.wait_for` is the one way to wait while supervising.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from streamhydro.brokers.process import die_with_parent
from streamhydro.driver.serve import QUERY_STARTED
from streamhydro.errors import StreamhydroError
from streamhydro.spark import STREAMING_CONF

log = logging.getLogger(__name__)

ERROR_PREFIX = "streamhydro: error: "
WORKER_DAEMON = STREAMING_CONF["spark.python.daemon.module"]
POLL_S = 0.2
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


class SupervisionError(StreamhydroError):
    """serve did not come up: the first start failed, or restarts kept failing for ``give_up_s``."""


def _processes() -> dict[int, tuple[int, int, int, int]]:
    """``{pid: (ppid, pgid, session id, resident pages)}`` of every process now."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        table[int(entry.name)] = (int(fields[1]), int(fields[2]), int(fields[3]), int(fields[21]))
    return table


def _argv(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except (FileNotFoundError, ProcessLookupError):
        return []


def _exited(pid: int) -> bool:
    """Whether ``pid`` is gone or a zombie (exited, not yet reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True


def _main_thread_ns(pid: int) -> int | None:
    """The CPU time ``pid``'s main thread has run, in nanoseconds (its schedstat); None once it is gone."""
    try:
        return int(Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()[0])
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return None


def starting_main_threads(pids: list[int], intervals: int, interval_s: float) -> list[int]:
    """Those of ``pids`` whose main thread, blocked (gaining no CPU time) for one interval of ``interval_s``,
    ran (gained CPU time) in the next: as soon as one is seen, within ``intervals`` intervals (else none).

    A Python worker's main thread blocks reading its socket while idle and runs only once the JVM sent it a
    task, so a blocked-then-running main thread is a task starting (or one resuming after a wait). Running
    alone is not: after each task the main thread runs on (PySpark's daemon loop calls ``gc.collect()``)
    while Spark already counts the worker idle: four workers found running and killed were all idle to
    Spark ("process from idle queue is dead"). Other threads (ONNX Runtime's pool, librdkafka's) do not
    count."""
    last = {pid: _main_thread_ns(pid) for pid in pids}
    blocked: set[int] = set()
    for _ in range(intervals):
        time.sleep(interval_s)
        now = {pid: _main_thread_ns(pid) for pid in last}
        alive = {pid for pid, ns in now.items() if ns is not None and last[pid] is not None}
        ran = {pid for pid in alive if now[pid] > last[pid]}
        if started := sorted(ran & blocked):
            return started
        blocked = alive - ran
        last = now
    return []


def process_tree(pid: int) -> dict[int, tuple[int, int, int, int]]:
    """``pid`` and its descendants, as ``{pid: (ppid, pgid, session id, resident pages)}``."""
    table = _processes()
    tree = {pid: table[pid]} if pid in table else {}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, row in table.items():
            if row[0] == parent and child not in tree:
                tree[child] = row
                frontier.append(child)
    return tree


def write_serve_config(path: Path, work: Path, bootstrap: str, kafka: Mapping[str, Any] | None = None) -> Path:
    """A serve config for benchmark and test runs: local[2], checkpoint and metrics under ``work``, the
    registry's promoted demo model, sequential CPU scoring, metrics on a free port, and ``[kafka]`` keys
    ``kafka`` on top of: topics ``events`` -> ``predictions`` / ``predictions-dlq``, ``source = "builtin"``."""
    return _write_config(path, {
        "spark": {"master": "local[2]", "checkpoint_location": str(work / "checkpoint")},
        "kafka": {"bootstrap_servers": bootstrap, "subscribe": "events", "source": "builtin", **(kafka or {})},
        "inference": {"pipeline_depth": 0},
        "metrics": {"port": 0, "multiprocess_dir": str(work / "metrics")},
    })


def write_minimal_config(
    path: Path, run: Path, bootstrap: str, input_topic: str, output_topic: str, model: Path | str, *layers: Mapping[str, Mapping[str, Any]]
) -> Path:
    """The README's minimal serve config, as users start from it: bootstrap servers, input, output and
    dead-letter topics, the model (``<registry>/<name>``: the registry's promoted version) and the checkpoint
    under ``run``; everything else serve's default. Metrics keep their default (on); only where they are
    served and kept moves (a free port, files under ``run``). ``layers``: config sections on top, later
    layers' keys over earlier ones'."""
    model = Path(model).resolve()
    return _write_config(path, {
        "spark": {"checkpoint_location": str(run / "checkpoint")},
        "kafka": {"bootstrap_servers": bootstrap, "subscribe": input_topic, "output_topic": output_topic, "dead_letter_topic": f"{output_topic}-dlq"},
        "model": {"registry": str(model.parent), "name": model.name},
        "metrics": {"port": 0, "multiprocess_dir": str(run / "metrics")},
    }, *layers)


def _write_config(path: Path, *layers: Mapping[str, Mapping[str, Any]]) -> Path:
    """A TOML config of sections whose values are strings, numbers and booleans (JSON spells those as TOML
    does); later layers' keys over earlier ones'."""
    sections: dict[str, dict[str, Any]] = {}
    for layer in layers:
        for section, keys in layer.items():
            sections.setdefault(section, {}).update(keys)
    path.write_text("".join(
        f"[{section}]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in keys.items()) + "\n"
        for section, keys in sections.items()
    ))
    return path


class ServeProcess:
    """One ``streamhydro serve --config FILE`` at a time, started again by :meth:`start` after it ended.
    ``python``: the interpreter that runs it (default this one), e.g. a fresh virtualenv's."""

    def __init__(self, config: Path, log_path: Path, python: str | None = None) -> None:
        self.config = config
        self.log_path = log_path
        self.python = python or sys.executable
        self.starts = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._log_start = 0
        self._scanned = 0
        self._started_query = False

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def third_party_log_path(self) -> Path:
        """Where serve puts Spark's, Kafka's and the libraries' output (beside :attr:`log_path`)."""
        return self.log_path.with_name("streamhydro-serve.log")

    def start(self) -> None:
        """Start serve (once the previous one has ended), appending its stdout and stderr to the log."""
        if self.poll() is None and self._process is not None:
            raise SupervisionError(f"serve pid {self.pid} is still running")
        self.starts += 1
        with open(self.log_path, "ab") as log_file:
            log_file.write(f"---- serve start {self.starts} at {time.strftime('%H:%M:%S')} ----\n".encode())
            log_file.flush()
            self._log_start = self._scanned = log_file.tell()
            self._process = subprocess.Popen(
                [self.python, "-m", "streamhydro", "--log-dir", str(self.log_path.parent), "serve", "--config", str(self.config)],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=die_with_parent,
            )
        self._started_query = False
        log.info("serve start %d: pid %d, log %s", self.starts, self._process.pid, self.log_path)

    def poll(self) -> int | None:
        """serve's exit code once it ended (negative: the signal that killed it), else None."""
        return self._process.poll() if self._process is not None else None

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def query_started(self) -> bool:
        """Whether this run of serve has logged that its query started."""
        if not self._started_query:
            self._started_query = QUERY_STARTED.encode() in self._new_output()
        return self._started_query

    def _new_output(self) -> bytes:
        """The log written by this run since the last call (from the start of the line last cut)."""
        with open(self.log_path, "rb") as log_file:
            log_file.seek(self._scanned)
            data = log_file.read()
        cut = data.rfind(b"\n") + 1
        self._scanned += cut
        return data[:cut]

    def error_line(self) -> str | None:
        """The last ``streamhydro: error:`` line this run of serve printed, if any."""
        with open(self.log_path, "rb") as log_file:
            log_file.seek(self._log_start)
            lines = [line for line in log_file.read().decode(errors="replace").splitlines() if line.startswith(ERROR_PREFIX)]
        return lines[-1] if lines else None

    def terminate(self, timeout_s: float) -> int | None:
        """SIGTERM to serve alone, then wait up to ``timeout_s``: its exit code, or None if it is still running."""
        if self._process is None:
            return None
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
        try:
            return self._process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> list[int]:
        """SIGKILL every process group of serve's tree (serve and the JVM; each Python worker daemon and its
        workers) and reap serve; nothing once serve has exited. Returns the process groups signalled."""
        if self._process is None or self._process.poll() is not None:
            return []  # reaped: its pid may be another process's by now
        tree = process_tree(self._process.pid)
        groups = sorted({pgid for _, pgid, _, _ in tree.values() if pgid in tree})
        for pgid in groups:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._process.wait()
        return groups

    def python_workers(self) -> list[int]:
        """The executor Python workers now alive: processes forked by one of Spark's Python worker daemons."""
        if not self.running():
            return []
        tree = process_tree(self._process.pid)
        # The daemon runs as `python -m streamhydro.executor.daemon ...` and its forks keep that command line
        # (the JVM's names the module too, inside a --conf argument).
        daemons = {pid for pid in tree if WORKER_DAEMON in _argv(pid)}
        return sorted(pid for pid, (ppid, _, _, _) in tree.items() if pid in daemons and ppid in daemons)

    def busy_python_workers(self, intervals: int = 50, interval_s: float = 0.02) -> list[int]:
        """The executor Python workers seen starting a task within ``intervals`` looks ``interval_s`` apart
        (:func:`starting_main_threads`), as soon as one is; none if none did. An idle worker, kept by Spark
        for reuse, blocks reading its socket: its main thread does not run until a task comes. The task
        may have ended by the time the caller acts: the effect of a signal to the worker is for the
        caller to check."""
        return starting_main_threads(self.python_workers(), intervals, interval_s)

    def session_processes(self) -> list[int]:
        """The processes left running in the session of the last serve started (serve, the JVM, the Python
        worker daemons and their workers all stay in it), also after serve itself has exited."""
        if self._process is None:
            return []
        return sorted(pid for pid, (_, _, sid, _) in _processes().items() if sid == self._process.pid and not _exited(pid))

    def wait_session_ended(self, timeout_s: float) -> list[int]:
        """After serve exited: wait up to ``timeout_s`` for the rest of its session to exit (the JVM, then
        the worker daemons, which end their workers). The processes still there, none when it ended."""
        deadline = time.monotonic() + timeout_s
        while (left := self.session_processes()) and time.monotonic() < deadline:
            time.sleep(POLL_S)
        return left

    def rss_mb(self) -> float:
        """The resident memory of serve's whole tree (driver, JVM, Python worker daemons and workers), in MB."""
        if not self.running():
            return 0.0
        pages = sum(rss for _, _, _, rss in process_tree(self._process.pid).values())
        return round(pages * PAGE_KB / 1024, 1)


class Supervisor:
    """Keeps serve running: restarts it ``restart_delay_s`` after it exits unasked, until :meth:`stop`.

    ``exits`` counts serve's unasked exit codes (negative: killed by that signal), ``restarts`` the
    restarts. Call :meth:`tick` often, or wait with :meth:`wait_for`.
    """

    def __init__(self, serve: ServeProcess, restart_delay_s: float = 2.0, give_up_s: float = 600.0, start_timeout_s: float = 300.0) -> None:
        self.serve = serve
        self.restart_delay_s = restart_delay_s
        self.give_up_s = give_up_s
        self.start_timeout_s = start_timeout_s
        self.restarts = 0
        self.exits: Counter[int] = Counter()
        self._exited_at: float | None = None
        self._last_up = time.monotonic()

    def start(self) -> None:
        """Start serve and wait until its query runs; a first start that fails is not retried."""
        self.serve.start()
        self.wait_for(lambda: self.serve.query_started() or self.serve.poll() is not None, self.start_timeout_s, restart=False)
        if not self.serve.query_started():
            raise SupervisionError(
                f"serve did not start its query within {self.start_timeout_s:.0f} s: "
                f"{self.serve.error_line() or 'no error printed'} (log {self.serve.log_path})"
            )

    def tick(self, restart: bool = True) -> None:
        """Note serve's state; restart it when it has been down for ``restart_delay_s``."""
        now = time.monotonic()
        code = self.serve.poll()
        if code is None:
            if self.serve.query_started():
                self._last_up = now
            return
        if self._exited_at is None:
            self._exited_at = now
            self.exits[code] += 1
            log.warning("serve exited with %d: %s", code, self.serve.error_line() or "no error printed")
        if not restart or now - self._exited_at < self.restart_delay_s:
            return
        if now - self._last_up > self.give_up_s:
            raise SupervisionError(
                f"serve has not run its query for {self.give_up_s:.0f} s across restarts; last: "
                f"{self.serve.error_line() or f'exit {code}'} (log {self.serve.log_path})"
            )
        self._exited_at = None
        self.restarts += 1
        self.serve.start()

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float, restart: bool = True) -> bool:
        """Supervise until ``predicate()`` holds (True) or ``timeout_s`` passed (False)."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.tick(restart)
            if predicate():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL_S)

    def idle(self, seconds: float) -> None:
        """Supervise for ``seconds``."""
        self.wait_for(lambda: False, seconds)

    def stop(self, up_timeout_s: float, stop_timeout_s: float) -> int | None:
        """The final stop: once serve's query runs (restarting it if needed, for up to ``up_timeout_s``),
        SIGTERM to serve alone. serve's exit code, or None if it did not exit within ``stop_timeout_s``."""
        if not self.wait_for(lambda: self.serve.running() and self.serve.query_started(), up_timeout_s):
            raise SupervisionError(f"serve's query was not running within {up_timeout_s:.0f} s for the final stop (log {self.serve.log_path})")
        return self.serve.terminate(stop_timeout_s)
