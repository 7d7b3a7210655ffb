"""Apicurio Registry as a local schema registry that speaks the Confluent Schema Registry REST API.

Runs where :class:`SchemaRegistryServer` is started: the test fixtures (one registry per test session) and
anything else that needs a real registry on this machine. It is Apicurio Registry
(``io.apicurio:apicurio-registry-app`` 2.4.2.Final, Quarkus 2.16, Java 17), which Maven Central serves
only as an application jar: :func:`streamhydro.jars.apicurio_registry` builds the runnable application
from it once into the jar cache (``streamhydro jars`` does it at set-up; otherwise the first start does).
Storage is in memory (H2), so everything registered is gone when it stops. The Confluent-compatible API
is at :attr:`SchemaRegistryServer.url` (``/apis/ccompat/v7``); schema ids are Apicurio's content ids.

Measured on the 2-core development machine beside other work (load 6-8): the build 4 min from an empty
Maven repository (231 MB into ``~/.m2``), 18 s with it filled, 131 MB in the jar cache; up and answering
4-6 s after the start (12-17 s on a busier machine), RSS ~205 MB idle, stopped (SIGTERM) in 0.3 s.
"""

from __future__ import annotations

import signal
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from streamhydro import jars
from streamhydro.brokers.process import BrokerConfig, BrokerProcess, java_binary

CCOMPAT_PATH = "/apis/ccompat/v7"


class SchemaRegistryServer(BrokerProcess):
    """Apicurio Registry on a free loopback port with in-memory storage.

    ``with SchemaRegistryServer() as registry: registry.url``. ``heap_mb``: the JVM's maximum heap.
    """

    kind = "schema-registry"
    stop_signal = signal.SIGTERM
    readiness = f"GET {CCOMPAT_PATH}/subjects"

    def __init__(self, config: BrokerConfig | None = None, heap_mb: int = 256) -> None:
        super().__init__(config, Path(tempfile.gettempdir()))
        self.heap_mb = heap_mb

    @property
    def url(self) -> str:
        """The base URL of the Confluent-compatible API, as ``schema.registry.url`` clients take it."""
        return f"http://{self.bootstrap_servers}{CCOMPAT_PATH}"

    def _command(self) -> list[str]:
        runner = jars.build(jars.apicurio_registry())
        return [
            java_binary(),
            f"-Xmx{self.heap_mb}m",
            "-XX:+UseSerialGC",
            # C1 only: a test registry needs no peak throughput; ~45 MB less RSS, no slower to start.
            "-XX:TieredStopAtLevel=1",
            f"-Dquarkus.http.host={self.config.host}",
            f"-Dquarkus.http.port={self.port}",
            "-jar",
            str(runner),
        ]

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/subjects", timeout=1.0) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def __enter__(self) -> SchemaRegistryServer:
        self.start()
        return self
