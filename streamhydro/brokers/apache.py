"""Apache Kafka as a local single-node KRaft broker, from the jars on Maven Central.

Runs where :class:`ApacheKafkaBroker` is started: the demo (``--broker kafka``, the default), the test
fixtures (one broker per test session) and the benchmarks. The jars come from :mod:`streamhydro.jars`
(resolved once into the jar cache); Java 17 runs them. One JVM is broker and controller at once, on
loopback ports chosen at first start and kept across restarts, with its log segments in ``data_dir``:
a broker stopped or killed (:meth:`~streamhydro.brokers.process.BrokerProcess.kill`) and started again
has everything it acknowledged, as a real one does.

Measured on the 2-core development machine: storage format 1.3 s, up and answering 3 s later, RSS
~320 MB idle.

``scram_users`` makes the client listener require SASL/SCRAM (SHA-256 and SHA-512) for those users; the
broker's own traffic uses a separate plaintext listener.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path

from streamhydro import jars
from streamhydro.brokers.process import BrokerConfig, BrokerProcess, free_port, java_binary
from streamhydro.errors import BrokerError

SCRAM_MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-512")
_SCRAM_MODULE = "org.apache.kafka.common.security.scram.ScramLoginModule"

# Single-node settings: replication factor 1 everywhere, one partition for internal topics (their
# creation on first use is then instant), no delay before the first consumer group rebalance, and a
# short broker session, so that after a crash the restarted broker need not wait out its old session
# (the default 9 s) before it serves.
_SINGLE_NODE = {
    "process.roles": "broker,controller",
    "node.id": "1",
    "controller.listener.names": "CONTROLLER",
    "num.partitions": "1",
    "offsets.topic.replication.factor": "1",
    "offsets.topic.num.partitions": "1",
    "transaction.state.log.replication.factor": "1",
    "transaction.state.log.min.isr": "1",
    "transaction.state.log.num.partitions": "1",
    "share.coordinator.state.topic.replication.factor": "1",
    "share.coordinator.state.topic.min.isr": "1",
    "group.initial.rebalance.delay.ms": "0",
    "broker.heartbeat.interval.ms": "500",
    "broker.session.timeout.ms": "2000",
}

_LOG_CONFIG = """\
Configuration:
  Appenders:
    Console:
      name: STDOUT
      PatternLayout:
        pattern: "[%d] %p %m (%c)%n"
  Loggers:
    Root:
      level: WARN
      AppenderRef:
        - ref: STDOUT
    Logger:
      - name: kafka.server.KafkaRaftServer
        level: INFO
"""


class ApacheKafkaBroker(BrokerProcess):
    """A KRaft Apache Kafka broker on free loopback ports.

    ``data_dir``: where it keeps its logs and metadata (a temporary folder, removed by ``__exit__``, when
    not given). ``heap_mb``: the JVM's maximum heap.
    """

    kind = "kafka"
    stop_signal = signal.SIGTERM

    def __init__(
        self,
        config: BrokerConfig | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        scram_users: Mapping[str, str] | None = None,
        heap_mb: int = 1024,
    ) -> None:
        self._owns_dir = data_dir is None
        work = Path(data_dir) if data_dir is not None else Path(tempfile.mkdtemp(prefix="streamhydro-kafka-"))
        work.mkdir(parents=True, exist_ok=True)
        super().__init__(config, work)
        self.scram_users = dict(scram_users or {})
        self.heap_mb = heap_mb
        self.controller_port: int | None = None
        self.internal_port: int | None = None

    @property
    def client_settings(self) -> dict[str, str]:
        """librdkafka settings for a client of the client listener (SCRAM-SHA-512 as the first user)."""
        if not self.scram_users:
            return {}
        user, password = next(iter(self.scram_users.items()))
        return {"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": user, "sasl.password": password}

    def _choose_ports(self) -> None:
        if self.port is None:
            self.port, self.controller_port, self.internal_port = (free_port(self.config.host) for _ in range(3))

    def _forget_ports(self) -> None:
        self.port = self.controller_port = self.internal_port = None

    def _properties(self) -> dict[str, str]:
        host = self.config.host
        client_protocol = "SASL_PLAINTEXT" if self.scram_users else "PLAINTEXT"
        properties = {
            **_SINGLE_NODE,
            "controller.quorum.voters": f"1@{host}:{self.controller_port}",
            "listeners": f"CLIENT://{host}:{self.port},INTERNAL://{host}:{self.internal_port},CONTROLLER://{host}:{self.controller_port}",
            "advertised.listeners": f"CLIENT://{host}:{self.port},INTERNAL://{host}:{self.internal_port}",
            "listener.security.protocol.map": f"CLIENT:{client_protocol},INTERNAL:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name": "INTERNAL",
            "log.dirs": str(self.work_dir / "logs"),
        }
        if self.scram_users:
            properties["sasl.enabled.mechanisms"] = ",".join(SCRAM_MECHANISMS)
            for mechanism in SCRAM_MECHANISMS:
                properties[f"listener.name.client.{mechanism.lower()}.sasl.jaas.config"] = f"{_SCRAM_MODULE} required;"
        return properties

    def _java(self) -> list[str]:
        classpath = os.pathsep.join(str(jar) for jar in jars.resolve(jars.kafka_broker()))
        return [java_binary(), f"-Xmx{self.heap_mb}m", "-XX:+UseSerialGC", f"-Dlog4j2.configurationFile={self.work_dir / 'log4j2.yaml'}", "-cp", classpath]

    def _prepare(self) -> None:
        """Write the configuration; format the storage once (with the SCRAM users) before the first start."""
        (self.work_dir / "log4j2.yaml").write_text(_LOG_CONFIG)
        server = self.work_dir / "server.properties"
        server.write_text("".join(f"{key}={value}\n" for key, value in self._properties().items()))
        if (self.work_dir / "logs" / "meta.properties").exists():
            return
        cluster_id = new_cluster_id()
        scram = [
            arg
            for user, password in self.scram_users.items()
            for mechanism in SCRAM_MECHANISMS
            for arg in ("--add-scram", f"{mechanism}=[name={user},password={password}]")
        ]
        done = subprocess.run(
            [*self._java(), "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(server), *scram],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise BrokerError(f"formatting Kafka's storage in {self.work_dir} failed: {(done.stdout + done.stderr)[-2000:]}")

    def _command(self) -> list[str]:
        return [*self._java(), "kafka.Kafka", str(self.work_dir / "server.properties")]

    def __exit__(self, *exc_info: object) -> None:
        super().__exit__(*exc_info)
        if self._owns_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)


def new_cluster_id() -> str:
    """A random cluster id as Kafka makes them: a UUID in URL-safe base64, never starting with "-"
    (the storage tool would read it as an option; Kafka's ``Uuid.randomUuid`` draws again too)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id
