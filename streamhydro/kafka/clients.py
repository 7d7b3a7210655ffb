"""Kafka clients cached per Python worker: one consumer and one producer per client configuration.

Runs in executor Python workers (reads and writes) and in the driver's Python processes. Creating a
librdkafka client costs ~0.5 s, more than many micro-batch tasks take, so the first task in a worker
creates it and later tasks reuse it.

Caveats:

- Reuse needs ``spark.python.worker.reuse=true`` (Spark's default, and in ``streamhydro.spark.STREAMING_CONF``); without
  it every task pays the creation cost.
- A worker runs one task at a time, so a cached client is never used by two tasks at once; each read
  assigns its own partition and unassigns it when done, so no state leaks from task to task.
- Clients live until the worker exits (idle workers are reaped by Spark). Each holds a few MB of buffers
  and a connection per broker; distinct configurations (for example a ``kafka.*`` option changed between
  queries) add clients, they do not replace them.
- PySpark forks workers from a daemon, and a librdkafka client does not survive a fork: the cache
  belongs to the process that filled it and is dropped when the pid changes.
- A producer in a fatal state (idempotence broken, fenced) is useless: :func:`discard_producer` drops it
  so the next task builds a new one.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING

from confluent_kafka import Consumer, KafkaException, Producer

from streamhydro.errors import ConfigError
from streamhydro.kafka.options import ClientConfig
from streamhydro.secrets import redact

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger(__name__)

_lock = threading.Lock()
_owner_pid = os.getpid()
_consumers: dict[ClientConfig, Consumer] = {}
_producers: dict[ClientConfig, Producer] = {}


def build_client(kind: Callable[[dict[str, str]], Consumer | Producer], config: ClientConfig):
    """Create a client, turning librdkafka's refusal of a setting into a ConfigError naming it."""
    try:
        return kind(config.as_dict())
    except (KafkaException, ValueError) as exc:
        raise ConfigError(
            "kafka.*",
            f"the Kafka client refused its configuration {config!r}: {redact(str(exc))}",
            "fix or remove the kafka.<setting> named above (names are librdkafka's, see its CONFIGURATION.md)",
        ) from exc


def _reset_after_fork() -> None:
    global _owner_pid
    if os.getpid() != _owner_pid:
        _consumers.clear()
        _producers.clear()
        _owner_pid = os.getpid()


def consumer(config: ClientConfig) -> Consumer:
    """This worker's consumer for ``config``, created on first use."""
    return _cached(Consumer, _consumers, config)


def producer(config: ClientConfig) -> Producer:
    """This worker's producer for ``config``, created on first use."""
    return _cached(Producer, _producers, config)


def close_all() -> None:
    """Close this process's cached clients (before their brokers go away, so nothing is left retrying)."""
    with _lock:
        for client in [*_consumers.values(), *_producers.values()]:
            client.close()
        _consumers.clear()
        _producers.clear()


def _cached(kind: type, cache: dict, config: ClientConfig):
    with _lock:
        _reset_after_fork()
        client = cache.get(config)
        if client is None:
            client = cache[config] = build_client(kind, config)
            log.info("created Kafka %s in pid %d: %r", kind.__name__.lower(), os.getpid(), config)
        return client


def discard_producer(config: ClientConfig, client: Producer) -> None:
    """Forget a producer in a fatal state, so the next :func:`producer` call builds a fresh one."""
    with _lock:
        if _producers.get(config) is client:
            del _producers[config]
            log.warning("discarded Kafka producer in a fatal state: %r", config)
