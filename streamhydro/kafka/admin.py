"""Topic administration for the CLI, the demo and the tests. Runs on the driver, once at start."""

from __future__ import annotations

import time
from collections.abc import Mapping

from confluent_kafka import KafkaError as ClientError
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from streamhydro.errors import KafkaConnectorError
from streamhydro.kafka.clients import build_client
from streamhydro.kafka.options import ClientConfig

_TIMEOUT_S = 30.0


def ensure_topics(client: ClientConfig, topics: Mapping[str, int]) -> None:
    """Create the missing ``{topic: partitions}`` and wait until all appear in the metadata. Idempotent.

    An existing topic is left as it is, whatever its partition count. ``client`` comes from
    :func:`~streamhydro.kafka.options.client_config` (or ``client_for``), like every client's settings.
    """
    bootstrap = client.get("bootstrap.servers")
    admin = build_client(AdminClient, client)
    existing = admin.list_topics(timeout=_TIMEOUT_S).topics
    missing = [NewTopic(name, num_partitions=count) for name, count in topics.items() if name not in existing]
    if missing:
        for name, future in admin.create_topics(missing, request_timeout=_TIMEOUT_S).items():
            try:
                future.result()
            except KafkaException as exc:
                if exc.args[0].code() != ClientError.TOPIC_ALREADY_EXISTS:
                    raise KafkaConnectorError(f"could not create topic {name!r} on {bootstrap}: {exc.args[0].str()}") from exc
    deadline = time.monotonic() + _TIMEOUT_S
    while True:
        metadata = admin.list_topics(timeout=_TIMEOUT_S).topics
        absent = sorted(name for name in topics if name not in metadata or metadata[name].error is not None)
        if not absent:
            return
        if time.monotonic() > deadline:
            raise KafkaConnectorError(
                f"topics {absent} did not appear in the metadata of {bootstrap} within {_TIMEOUT_S} s. "
                "Fix: check the broker's log and that the client may create topics"
            )
        time.sleep(0.1)
