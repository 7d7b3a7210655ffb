"""A local broker as a child process: start on free loopback ports, wait until it answers, stop, never leak.

Runs on the driver (the demo), in test fixtures and in benchmarks, once per broker. :class:`BrokerProcess`
holds what every local broker shares; :mod:`streamhydro.brokers.apache` and :mod:`streamhydro.brokers.tansu`
say how each one is started. The tests' schema registry (:mod:`streamhydro.brokers.schema_registry`) is
such a child process too, ready when its HTTP API answers.

A broker never outlives its parent:

- :meth:`BrokerProcess.stop` (also run by ``__exit__``) sends the broker's own stop signal, waits, then
  SIGKILL;
- an ``atexit`` hook stops every broker still running when the interpreter exits normally;
- ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` in the child makes the kernel kill the broker if the parent dies
  without running Python's exit hooks (SIGKILL, crash). The signal fires when the *thread* that started
  the broker exits, so start it from a thread that lives as long as the broker (the main thread, normally).

Each broker runs in its own session (process group), so a Ctrl-C in the terminal reaches only the parent,
which stops the broker last, after everything using it has finished; fault-injection tests signal the
group with :meth:`BrokerProcess.send_signal`.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import ClassVar

from streamhydro.errors import BrokerError

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_LOG_TAIL_BYTES = 4000
_RUNNING: set[BrokerProcess] = set()
_RUNNING_LOCK = threading.Lock()


@dataclass(frozen=True)
class BrokerConfig:
    """How to run a local broker.

    ``start_timeout_s``: how long to wait for the first metadata answer. ``stop_timeout_s``: how long the
    stop signal may take before SIGKILL. ``port_attempts``: fresh ports to try when a chosen one is taken
    between probing and binding. ``log_dir``: where the broker's log goes (default: its work folder or the
    temp folder).
    """

    host: str = "127.0.0.1"
    start_timeout_s: float = 60.0
    stop_timeout_s: float = 20.0
    port_attempts: int = 3
    log_dir: str | None = None


def free_port(host: str = "127.0.0.1") -> int:
    """A port on ``host`` that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def java_binary() -> str:
    """``$JAVA_HOME/bin/java``, else ``java`` on the PATH. Raises BrokerError when there is none."""
    java = Path(os.environ["JAVA_HOME"]) / "bin" / "java" if os.environ.get("JAVA_HOME") else shutil.which("java")
    if java is None:
        raise BrokerError("Java is not installed. Fix: install Java 17 (apt-get install openjdk-17-jre-headless)")
    return str(java)


def die_with_parent() -> None:
    """preexec_fn: ask the kernel to SIGKILL the child when the thread that started it dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def answers_metadata(client: Mapping[str, str]) -> bool:
    """Whether a broker answers a metadata request within a second, with these librdkafka settings."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    from streamhydro.kafka.clients import build_client
    from streamhydro.kafka.options import ClientConfig

    # log_level 0: refused connections are expected while the broker starts; do not print them.
    settings = {**client, "socket.connection.setup.timeout.ms": "1000", "log_level": "0"}
    admin = build_client(AdminClient, ClientConfig.of(settings))
    try:
        admin.list_topics(timeout=1.0)
    except KafkaException:
        return False
    return True


class BrokerProcess:
    """One local broker process; subclasses say how to prepare and start it.

    ``with Broker() as b: b.bootstrap_servers``. ``client_settings`` are the librdkafka settings a client
    needs besides the bootstrap servers (SASL, for a broker that requires it).
    """

    kind: ClassVar[str]
    stop_signal: ClassVar[signal.Signals] = signal.SIGTERM
    readiness: ClassVar[str] = "a metadata request"

    def __init__(self, config: BrokerConfig | None, work_dir: Path) -> None:
        self.config = config or BrokerConfig()
        self.work_dir = work_dir
        self._process: subprocess.Popen[bytes] | None = None
        self.port: int | None = None
        log_dir = Path(self.config.log_dir) if self.config.log_dir else work_dir
        self.log_path = log_dir / f"streamhydro-{self.kind}-{os.getpid()}-{id(self):x}.log"

    @property
    def bootstrap_servers(self) -> str:
        if self.port is None or not self.running():
            raise BrokerError(f"the {self.kind} broker is not running; call start() or use it as a context manager")
        return f"{self.config.host}:{self.port}"

    @property
    def client_settings(self) -> dict[str, str]:
        return {}

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> BrokerProcess:
        """Start the broker and return once it answers (:meth:`_ready`). Raises BrokerError otherwise."""
        if self.running():
            return self
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, self.config.port_attempts + 1):
            started = time.monotonic()
            if self._start_once():
                log.info(
                    "%s broker up at %s in %.1f s (pid %d, log %s)",
                    self.kind, self.bootstrap_servers, time.monotonic() - started, self.pid, self.log_path,
                )
                return self
            log.warning("%s broker did not start (attempt %d of %d)", self.kind, attempt, self.config.port_attempts)
            self._forget_ports()
        raise BrokerError(
            f"the {self.kind} broker did not answer {self.readiness} within {self.config.start_timeout_s} s "
            f"after {self.config.port_attempts} attempts; log {self.log_path} ends with:\n{self.log_tail()}\n"
            "Fix: raise BrokerConfig.start_timeout_s on a loaded machine, or read the log above"
        )

    def _choose_ports(self) -> None:
        """Pick the ports the next start binds (kept across restarts once a start succeeded)."""
        if self.port is None:
            self.port = free_port(self.config.host)

    def _forget_ports(self) -> None:
        self.port = None

    def _prepare(self) -> None:
        """Anything to do once before the first start (format storage...)."""

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _environment(self) -> dict[str, str] | None:
        return None

    def _ready(self) -> bool:
        """Whether the started process serves: it answers :attr:`readiness`, within about a second."""
        return answers_metadata({"bootstrap.servers": self.bootstrap_servers, **self.client_settings})

    def _start_once(self) -> bool:
        self._choose_ports()
        self._prepare()
        with open(self.log_path, "ab") as log_file:
            self._process = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=self._environment(),
                preexec_fn=die_with_parent,
                start_new_session=True,
            )
        with _RUNNING_LOCK:
            _RUNNING.add(self)
        deadline = time.monotonic() + self.config.start_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                break
            if self._ready():
                return True
            time.sleep(0.1)
        self._end(signal.SIGKILL)
        return False

    def stop(self) -> None:
        """Stop the broker: its stop signal, wait ``stop_timeout_s``, then SIGKILL. Idempotent.

        :meth:`start` afterwards brings it back on the same ports (and, where it keeps any, the same data).
        """
        self._end(self.stop_signal)

    def kill(self) -> None:
        """SIGKILL the broker, as a crash would; :meth:`start` brings it back on the same ports and data."""
        self._end(signal.SIGKILL)

    def send_signal(self, signum: int) -> None:
        """Send ``signum`` to the broker's process group (SIGSTOP / SIGCONT stall and resume it)."""
        if self._process is not None:
            os.killpg(self._process.pid, signum)

    def _end(self, signum: int) -> None:
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signum)
            if signum != signal.SIGKILL:
                os.killpg(process.pid, signal.SIGCONT)
            try:
                process.wait(timeout=self.config.stop_timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s broker pid %d ignored signal %d; killing it", self.kind, process.pid, signum)
                process.kill()
                process.wait()
        self._process = None
        with _RUNNING_LOCK:
            _RUNNING.discard(self)

    def log_tail(self) -> str:
        """The last few KB of the broker's log, for error messages."""
        try:
            with open(self.log_path, "rb") as log_file:
                log_file.seek(0, os.SEEK_END)
                log_file.seek(max(0, log_file.tell() - _LOG_TAIL_BYTES))
                return log_file.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return "(no log written)"

    def __enter__(self) -> BrokerProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"running at {self.bootstrap_servers}" if self.running() else "stopped"
        return f"{type(self).__name__}({state}, log={self.log_path})"


@atexit.register
def _stop_all() -> None:
    with _RUNNING_LOCK:
        brokers = list(_RUNNING)
    for broker in brokers:
        broker.stop()
