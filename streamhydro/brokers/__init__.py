"""Local Kafka-protocol brokers for the demo, the tests and the benchmarks.

- :class:`ApacheKafkaBroker`: Apache Kafka itself (KRaft, one node) from Maven Central's jars; what users
  run, and the default everywhere.
- :class:`TansuBroker`: Tansu from PyPI; no Java, up in milliseconds, in-memory, with the defects listed in
  :mod:`streamhydro.brokers.tansu`.

Beside them, :class:`SchemaRegistryServer`: Apicurio Registry, a schema registry with the Confluent API.
"""

from __future__ import annotations

from streamhydro.brokers.apache import ApacheKafkaBroker
from streamhydro.brokers.process import BrokerConfig, BrokerProcess
from streamhydro.brokers.schema_registry import SchemaRegistryServer
from streamhydro.brokers.tansu import TansuBroker

BROKERS: dict[str, type[BrokerProcess]] = {"kafka": ApacheKafkaBroker, "tansu": TansuBroker}

__all__ = ["BROKERS", "ApacheKafkaBroker", "BrokerConfig", "BrokerProcess", "SchemaRegistryServer", "TansuBroker"]
