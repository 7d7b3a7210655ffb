"""The connector's options: parsing, validation, and the one translation point to librdkafka settings.

Runs on the driver when a query is planned (``DataSource.streamReader`` / ``writer``); the frozen results
are pickled to executor Python workers, where :class:`ClientConfig` keys the per-worker client cache.

Option names follow Spark's built-in Kafka source and sink (``kafka.bootstrap.servers``, ``subscribe``,
``startingOffsets``...), so a deployment that has the JVM connector switches by changing the format only.
Every ``kafka.*`` option goes to the confluent-kafka (librdkafka) client with the prefix stripped; the
few Java-client settings librdkafka spells differently are translated or refused with the equivalent.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from streamhydro.errors import ConfigError

KAFKA_PREFIX = "kafka."
BOOTSTRAP = "kafka.bootstrap.servers"
GROUP_ID = "group.id"

EARLIEST = -2
LATEST = -1

# Spark Kafka options this connector does not implement: refused, never silently ignored.
_UNSUPPORTED_SOURCE_OPTIONS = {
    "startingoffsetsbytimestamp": "use startingOffsets (the embedded broker ignores timestamps in lookups)",
    "startingtimestamp": "use startingOffsets",
    "startingoffsetsbytimestampstrategy": "use startingOffsets",
    "endingoffsets": "streaming queries read until stopped; use Trigger.AvailableNow to stop at the end",
    "endingoffsetsbytimestamp": "use Trigger.AvailableNow",
    "endingtimestamp": "use Trigger.AvailableNow",
    "minoffsetspertrigger": "use maxOffsetsPerTrigger with a processing-time trigger",
    "maxtriggerdelay": "use maxOffsetsPerTrigger with a processing-time trigger",
    "minpartitions": "one Spark partition per Kafka partition; add Kafka partitions or repartition()",
    "groupidprefix": "set kafka.group.id to mirror committed offsets to a consumer group",
}

# Java-client settings librdkafka spells differently: Java name -> (librdkafka name, value conversion).
_RENAMED_KEYS = {
    "max.request.size": ("message.max.bytes", str),
    "fetch.max.wait.ms": ("fetch.wait.max.ms", str),
    "buffer.memory": ("queue.buffering.max.kbytes", lambda v: str(max(1, int(v) // 1024))),
}

# Java-client settings librdkafka does not have, with what to use instead.
_JVM_ONLY_KEYS = {
    "ssl.truststore.location": "put the CA certificates in a PEM file and set kafka.ssl.ca.location",
    "ssl.truststore.password": "put the CA certificates in a PEM file and set kafka.ssl.ca.location",
    "ssl.truststore.type": "put the CA certificates in a PEM file and set kafka.ssl.ca.location",
    "ssl.keystore.type": "librdkafka reads PKCS#12 keystores (kafka.ssl.keystore.location) or PEM "
    "(kafka.ssl.certificate.location + kafka.ssl.key.location)",
    "key.deserializer": "remove it: the source returns key and value as binary, cast them in Spark",
    "value.deserializer": "remove it: the source returns key and value as binary, cast them in Spark",
    "key.serializer": "remove it: the sink writes binary or string columns as they are",
    "value.serializer": "remove it: the sink writes binary or string columns as they are",
    "interceptor.classes": "remove it: Java interceptors cannot run in librdkafka",
    "enable.auto.commit": "remove it: offsets live in Spark's checkpoint (kafka.group.id mirrors them)",
    "auto.offset.reset": "use startingOffsets",
    "max.poll.records": "remove it: reads are planned per micro-batch (maxOffsetsPerTrigger)",
    "sasl.login.callback.handler.class": "use librdkafka's sasl.oauthbearer.* settings",
    "sasl.client.callback.handler.class": "use librdkafka's sasl.oauthbearer.* settings",
}

_SECRET_MARKERS = ("password", "secret", "sasl.oauthbearer.config", "ssl.key.pem", "ssl_key")

_JAAS = re.compile(r"^\s*(?P<module>[\w.$]+)\s+(required|requisite|sufficient|optional)\s*(?P<opts>.*?);?\s*$", re.S)
_JAAS_OPTION = re.compile(r'(\w+)\s*=\s*"((?:[^"\\]|\\.)*)"')
_USER_PASSWORD_MODULES = ("PlainLoginModule", "ScramLoginModule")


def _is_secret(key: str) -> bool:
    return any(marker in key for marker in _SECRET_MARKERS)


@dataclass(frozen=True)
class ClientConfig:
    """A librdkafka configuration, frozen and hashable (it keys the per-worker client cache).

    ``repr`` masks secrets, so configs can be logged.
    """

    items: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, settings: Mapping[str, str]) -> ClientConfig:
        return cls(tuple(sorted((str(k), str(v)) for k, v in settings.items())))

    def as_dict(self) -> dict[str, str]:
        return dict(self.items)

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.as_dict().get(key, default)

    def with_defaults(self, defaults: Mapping[str, str]) -> ClientConfig:
        """These settings on top of ``defaults``: what the user set wins."""
        return ClientConfig.of({**defaults, **self.as_dict()})

    def without(self, *keys: str) -> ClientConfig:
        return ClientConfig(tuple((k, v) for k, v in self.items if k not in keys))

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={'***' if _is_secret(k) else v}" for k, v in self.items)
        return f"ClientConfig({shown})"


def _lower(options: Mapping[str, str]) -> dict[str, str]:
    """Spark hands options case-insensitively (lower-cased keys); plain dicts get the same treatment."""
    return {str(k).lower(): str(v) for k, v in options.items()}


def translate_jaas(jaas: str) -> dict[str, str]:
    """``sasl.jaas.config`` (Java) -> librdkafka ``sasl.username`` / ``sasl.password``."""
    match = _JAAS.match(jaas)
    if match is None:
        raise ConfigError(
            "kafka.sasl.jaas.config",
            "is not a JAAS entry of the form '<LoginModule> required key=\"value\" ...;'",
            "set kafka.sasl.username and kafka.sasl.password instead",
        )
    module = match.group("module")
    if not module.endswith(_USER_PASSWORD_MODULES):
        raise ConfigError(
            "kafka.sasl.jaas.config",
            f"login module {module} has no librdkafka equivalent",
            "for OAUTHBEARER set kafka.sasl.oauthbearer.method and kafka.sasl.oauthbearer.* ; "
            "for GSSAPI set kafka.sasl.kerberos.* ",
        )
    fields = {key: value.replace('\\"', '"') for key, value in _JAAS_OPTION.findall(match.group("opts"))}
    missing = [name for name in ("username", "password") if name not in fields]
    if missing:
        raise ConfigError(
            "kafka.sasl.jaas.config",
            f"{module} entry has no {' and no '.join(missing)}",
            'add username="..." password="..." or set kafka.sasl.username / kafka.sasl.password',
        )
    return {"sasl.username": fields["username"], "sasl.password": fields["password"]}


def client_config(options: Mapping[str, str]) -> ClientConfig:
    """Every ``kafka.*`` option, prefix stripped and translated to librdkafka. Requires the bootstrap servers."""
    lowered = _lower(options)
    if not lowered.get(BOOTSTRAP, "").strip():
        raise ConfigError(BOOTSTRAP, "is missing", "set option kafka.bootstrap.servers to host:port[,host:port]")
    settings: dict[str, str] = {}
    for key, value in lowered.items():
        if not key.startswith(KAFKA_PREFIX):
            continue
        name = key[len(KAFKA_PREFIX) :]
        if name in _JVM_ONLY_KEYS:
            raise ConfigError(key, "is a Java-client setting librdkafka does not have", _JVM_ONLY_KEYS[name])
        if name == "sasl.jaas.config":
            settings.update(translate_jaas(value))
        elif name in _RENAMED_KEYS:
            target, convert = _RENAMED_KEYS[name]
            try:
                settings[target] = convert(value)
            except ValueError as exc:
                raise ConfigError(key, f"{value!r} is not a number", f"set {key} to a whole number") from exc
        else:
            settings[name] = value
    return ClientConfig.of(settings)


@dataclass(frozen=True)
class Subscription:
    """What to read: ``subscribe`` (topics), ``subscribePattern`` (regex), or ``assign`` (topic-partitions)."""

    kind: Literal["subscribe", "subscribePattern", "assign"]
    topics: tuple[str, ...] = ()
    pattern: str | None = None
    assigned: tuple[tuple[str, int], ...] = ()

    def matches(self, topic: str) -> bool:
        if self.kind == "subscribe":
            return topic in self.topics
        if self.kind == "subscribePattern":
            return re.fullmatch(self.pattern or "", topic) is not None
        return any(t == topic for t, _ in self.assigned)

    def select(self, metadata: Mapping[str, int]) -> list[tuple[str, int]]:
        """The topic-partitions to read, given ``{topic: partition count}`` from the broker's metadata."""
        if self.kind == "assign":
            return [(t, p) for t, p in self.assigned if p < metadata.get(t, 0)]
        return [(t, p) for t in sorted(metadata) if self.matches(t) for p in range(metadata[t])]


def parse_subscription(options: Mapping[str, str]) -> Subscription:
    lowered = _lower(options)
    given = [name for name in ("subscribe", "subscribepattern", "assign") if lowered.get(name, "").strip()]
    if len(given) != 1:
        raise ConfigError(
            "subscribe",
            f"exactly one of subscribe, subscribePattern, assign must be set, got {given or 'none'}",
            'set subscribe="topic1,topic2", subscribePattern="regex" or assign=\'{"topic":[0,1]}\'',
        )
    kind = given[0]
    value = lowered[kind]
    if kind == "subscribe":
        topics = tuple(t.strip() for t in value.split(",") if t.strip())
        return Subscription("subscribe", topics=topics)
    if kind == "subscribepattern":
        try:
            re.compile(value)
        except re.error as exc:
            raise ConfigError(
                "subscribePattern", f"{value!r} is not a regular expression ({exc})", "fix the regex"
            ) from exc
        return Subscription("subscribePattern", pattern=value)
    fix = 'give a JSON object of topic to partition list, e.g. {"events":[0,1]}'
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise ConfigError("assign", f"{value!r} is not JSON ({exc})", fix) from exc
    if not isinstance(parsed, dict) or not all(
        isinstance(parts, list) and all(isinstance(p, int) and p >= 0 for p in parts) for parts in parsed.values()
    ):
        raise ConfigError("assign", f"{value!r} is not an object of topic to partition numbers", fix)
    return Subscription("assign", assigned=tuple(sorted((t, p) for t, parts in parsed.items() for p in parts)))


TopicPartitionKey = tuple[str, int]


@dataclass(frozen=True)
class StartingOffsets:
    """``earliest``, ``latest``, or specific offsets per topic-partition (-2 earliest, -1 latest)."""

    kind: Literal["earliest", "latest", "specific"]
    specific: tuple[tuple[TopicPartitionKey, int], ...] = ()


def parse_starting_offsets(value: str | None) -> StartingOffsets:
    if value is None or value.strip().lower() == "latest":
        return StartingOffsets("latest")
    if value.strip().lower() == "earliest":
        return StartingOffsets("earliest")
    fix = 'use earliest, latest, or JSON like {"topic":{"0":23,"1":-2}} (-2 earliest, -1 latest)'
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise ConfigError("startingOffsets", f"{value!r} is neither earliest, latest nor JSON", fix) from exc
    try:
        offsets = offsets_from_json(parsed)
    except (TypeError, ValueError, AttributeError) as exc:
        raise ConfigError("startingOffsets", f"{value!r} is not an object of topic to partition offsets", fix) from exc
    if any(offset < EARLIEST for offset in offsets.values()):
        raise ConfigError("startingOffsets", f"{value!r} holds an offset below -2", fix)
    return StartingOffsets("specific", tuple(sorted(offsets.items())))


def offsets_from_json(offsets: Mapping[str, Mapping[str, int]]) -> dict[TopicPartitionKey, int]:
    """Spark-checkpoint offsets ``{"topic": {"0": 12}}`` -> ``{("topic", 0): 12}``."""
    return {(topic, int(part)): int(off) for topic, parts in offsets.items() for part, off in parts.items()}


def offsets_to_json(offsets: Mapping[TopicPartitionKey, int]) -> dict[str, dict[str, int]]:
    """``{("topic", 0): 12}`` -> ``{"topic": {"0": 12}}``, ordered, as Spark's Kafka source writes it."""
    result: dict[str, dict[str, int]] = {}
    for (topic, part), off in sorted(offsets.items()):
        result.setdefault(topic, {})[str(part)] = int(off)
    return result


def _positive_int(lowered: Mapping[str, str], key: str, display: str) -> int | None:
    raw = lowered.get(key)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ConfigError(display, f"{raw!r} is not a positive integer", f"set {display} to a whole number > 0")
    return value


def _bool(lowered: Mapping[str, str], key: str, display: str, default: bool) -> bool:
    raw = lowered.get(key)
    if raw is None:
        return default
    if raw.strip().lower() not in ("true", "false"):
        raise ConfigError(display, f"{raw!r} is not a boolean", f"set {display} to true or false")
    return raw.strip().lower() == "true"


END_OFFSETS_FETCH = "fetch"
END_OFFSETS_LIST = "listOffsets"


@dataclass(frozen=True)
class SourceOptions:
    """Everything the streaming reader needs, parsed once on the driver.

    ``end_offsets``: ``fetch`` (default) takes each partition's end from a Fetch response's high watermark,
    right on every broker; ``listOffsets`` trusts ListOffsets(latest), one request cheaper, and right only
    on brokers that answer it correctly (Apache Kafka; not Tansu, where it stalls the stream short of the
    end).
    """

    client: ClientConfig
    subscription: Subscription
    starting: StartingOffsets
    max_offsets_per_trigger: int | None
    fail_on_data_loss: bool
    poll_timeout_ms: int
    end_offsets: str

    @property
    def group_id(self) -> str | None:
        return self.client.get(GROUP_ID)


def parse_source_options(options: Mapping[str, str]) -> SourceOptions:
    lowered = _lower(options)
    for key, fix in _UNSUPPORTED_SOURCE_OPTIONS.items():
        if key in lowered:
            raise ConfigError(key, "is not supported by streamhydro's Kafka source", fix)
    end_offsets = lowered.get("endoffsetsfrom", END_OFFSETS_FETCH)
    if end_offsets.lower() not in (END_OFFSETS_FETCH.lower(), END_OFFSETS_LIST.lower()):
        raise ConfigError("endOffsetsFrom", f"{end_offsets!r} is unknown", "use fetch (default) or listOffsets")
    return SourceOptions(
        client=client_config(options),
        subscription=parse_subscription(options),
        starting=parse_starting_offsets(lowered.get("startingoffsets")),
        max_offsets_per_trigger=_positive_int(lowered, "maxoffsetspertrigger", "maxOffsetsPerTrigger"),
        fail_on_data_loss=_bool(lowered, "failondataloss", "failOnDataLoss", default=True),
        poll_timeout_ms=_positive_int(lowered, "kafkaconsumer.polltimeoutms", "kafkaConsumer.pollTimeoutMs") or 120_000,
        end_offsets=END_OFFSETS_LIST if end_offsets.lower() == END_OFFSETS_LIST.lower() else END_OFFSETS_FETCH,
    )


@dataclass(frozen=True)
class SinkOptions:
    """The sink's settings: the producer's client config and the default ``topic`` (None: per-row column)."""

    client: ClientConfig
    topic: str | None


def parse_sink_options(options: Mapping[str, str]) -> SinkOptions:
    lowered = _lower(options)
    topic = lowered.get("topic", "").strip() or None
    return SinkOptions(client=client_config(options), topic=topic)
