"""The connector's options: parsing, validation, and the one translation point between Kafka clients.

Runs on the driver when a query is planned (``DataSource.streamReader``) and when the service starts; the
frozen results are pickled to executor Python workers, where :class:`ClientConfig` keys the per-worker
client cache.

Option names follow Spark's built-in Kafka source (``kafka.bootstrap.servers``, ``subscribe``,
``startingOffsets``...), so ``serve`` gives both connectors the same options. Client settings travel as
``kafka.``-prefixed options in **Kafka's Java spelling**, which is what Spark's JVM connector reads. Users
write them once, in either client's spelling (``[kafka].client``):

- :func:`spark_options` turns them into Java-spelled ``kafka.*`` options: librdkafka's ``sasl.username`` /
  ``sasl.password`` become a ``sasl.jaas.config`` entry, ``ssl.ca.location`` a PEM truststore, and the few
  settings spelled differently are renamed; settings only librdkafka has are kept as they are (they
  serve streamhydro's own clients, and :func:`check_jvm_options` refuses them for the JVM connector).
- :func:`client_config` turns ``kafka.*`` options into librdkafka settings for every client streamhydro
  builds (range readers, prediction producers, admin, load generator, probes): the reverse translation,
  refusing with the equivalent what librdkafka cannot do (JKS truststores, Java class names).
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Literal

from streamhydro.choices import parse_choice
from streamhydro.errors import ConfigError
from streamhydro.kafka.planning import TopicPartitionKey
from streamhydro.secrets import masked

KAFKA_PREFIX = "kafka."
BOOTSTRAP = "kafka.bootstrap.servers"
GROUP_ID = "group.id"
# Chosen by streamhydro for exactly-once delivery, one per input partition; refused from users.
TRANSACTIONAL_ID = "transactional.id"
ISOLATION_LEVEL = "isolation.level"
READ_COMMITTED = "read_committed"
READ_UNCOMMITTED = "read_uncommitted"

EARLIEST = -2
LATEST = -1


class Connector(enum.StrEnum):
    """Which Kafka connector ``serve`` reads and writes with (``kafka.source``)."""

    BUILTIN = "builtin"  # Spark's JVM source and sink around the scoring (spark-sql-kafka)
    PYTHON = "python"  # streamhydro's: each task reads, scores and writes its range in one Python worker


class Delivery(enum.StrEnum):
    """The delivery guarantee of predictions and dead letters (``kafka.delivery``)."""

    AT_LEAST_ONCE = "at_least_once"  # a replayed micro-batch is written again, with the same idempotency key
    EXACTLY_ONCE = "exactly_once"  # each range written in Kafka transactions (streamhydro.kafka.transactions)


class EndOffsets(enum.StrEnum):
    """How streamhydro's source learns where partitions end (``kafka.end_offsets_from``, option ``endOffsetsFrom``)."""

    LIST_OFFSETS = "listOffsets"  # ListOffsets(latest), as Apache Kafka answers it and Spark's connector trusts it
    FETCH = "fetch"  # a Fetch response's high watermark, for brokers whose ListOffsets is wrong (Tansu)


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


def _kbytes(value: str) -> str:
    return str(max(1, int(value) // 1024))


def _bytes(value: str) -> str:
    return str(int(value) * 1024)


# Settings the two clients spell differently: Java name -> (librdkafka name, Java->librdkafka value,
# librdkafka->Java value).
_RENAMED_KEYS = {
    "max.request.size": ("message.max.bytes", str, str),
    "fetch.max.wait.ms": ("fetch.wait.max.ms", str, str),
    "buffer.memory": ("queue.buffering.max.kbytes", _kbytes, _bytes),
    "sasl.mechanism": ("sasl.mechanisms", str, str),
}
_FROM_LIBRDKAFKA = {librdkafka: (java, to_java) for java, (librdkafka, _, to_java) in _RENAMED_KEYS.items()}

# Java-client settings librdkafka does not have, with what to use instead.
_JVM_ONLY_KEYS = {
    "ssl.truststore.password": "put the CA certificates in a PEM file and set ssl.ca.location",
    "ssl.keystore.type": "librdkafka reads PKCS#12 keystores (ssl.keystore.location) or PEM "
    "(ssl.certificate.location + ssl.key.location)",
    "key.deserializer": "remove it: records are read as bytes, and payload.format decodes their values",
    "value.deserializer": "remove it: records are read as bytes, and payload.format decodes their values",
    "key.serializer": "remove it: predictions and dead letters are written as the bytes serve encodes",
    "value.serializer": "remove it: predictions and dead letters are written as the bytes serve encodes",
    "interceptor.classes": "remove it: Java interceptors cannot run in librdkafka",
    "enable.auto.commit": "remove it: offsets live in Spark's checkpoint (kafka.group.id mirrors them)",
    "auto.offset.reset": "use startingOffsets",
    "max.poll.records": "remove it: reads are planned per micro-batch (maxOffsetsPerTrigger)",
    "sasl.login.callback.handler.class": "use librdkafka's sasl.oauthbearer.* settings",
    "sasl.client.callback.handler.class": "use librdkafka's sasl.oauthbearer.* settings",
}

# librdkafka settings the JVM connector cannot be given, with what to use instead. Others without a
# Java equivalent are found by :func:`check_jvm_options` against the Java client's own list.
_LIBRDKAFKA_ONLY_FIXES = {
    "ssl.certificate.location": "use ssl.keystore.location with a PKCS#12 keystore (both clients read it)",
    "ssl.key.location": "use ssl.keystore.location with a PKCS#12 keystore (both clients read it)",
    "ssl.key.pem": "use ssl.keystore.location with a PKCS#12 keystore (both clients read it)",
    "ssl.certificate.pem": "use ssl.keystore.location with a PKCS#12 keystore (both clients read it)",
    "ssl.ca.pem": "put the CA certificates in a file and set ssl.ca.location",
}

_JAAS = re.compile(r"^\s*(?P<module>[\w.$]+)\s+(required|requisite|sufficient|optional)\s*(?P<opts>.*?);?\s*$", re.S)
_JAAS_OPTION = re.compile(r'(\w+)\s*=\s*"((?:[^"\\]|\\.)*)"')
_USER_PASSWORD_MODULES = ("PlainLoginModule", "ScramLoginModule")
_LOGIN_MODULES = {
    "PLAIN": "org.apache.kafka.common.security.plain.PlainLoginModule",
    "SCRAM-SHA-256": "org.apache.kafka.common.security.scram.ScramLoginModule",
    "SCRAM-SHA-512": "org.apache.kafka.common.security.scram.ScramLoginModule",
}


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
        shown = ", ".join(f"{k}={v}" for k, v in masked(self.as_dict()).items())
        return f"ClientConfig({shown})"


def _lower(options: Mapping[str, str]) -> dict[str, str]:
    """Spark hands options case-insensitively (lower-cased keys); plain dicts get the same treatment."""
    return {str(k).lower(): str(v) for k, v in options.items()}


def _escape_jaas(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def translate_jaas(jaas: str) -> dict[str, str]:
    """``sasl.jaas.config`` (Java) -> librdkafka ``sasl.username`` / ``sasl.password``."""
    match = _JAAS.match(jaas)
    if match is None:
        raise ConfigError(
            "kafka.sasl.jaas.config",
            "is not a JAAS entry of the form '<LoginModule> required key=\"value\" ...;'",
            "set sasl.username and sasl.password instead",
        )
    module = match.group("module")
    if not module.endswith(_USER_PASSWORD_MODULES):
        raise ConfigError(
            "kafka.sasl.jaas.config",
            f"login module {module} has no librdkafka equivalent",
            "for OAUTHBEARER set sasl.oauthbearer.method and sasl.oauthbearer.* ; for GSSAPI set sasl.kerberos.* ",
        )
    fields = {key: value.replace('\\"', '"').replace("\\\\", "\\") for key, value in _JAAS_OPTION.findall(match.group("opts"))}
    missing = [name for name in ("username", "password") if name not in fields]
    if missing:
        raise ConfigError(
            "kafka.sasl.jaas.config",
            f"{module} entry has no {' and no '.join(missing)}",
            'add username="..." password="..." or set sasl.username / sasl.password',
        )
    return {"sasl.username": fields["username"], "sasl.password": fields["password"]}


def jaas_entry(mechanism: str, username: str, password: str) -> str:
    """librdkafka ``sasl.username`` / ``sasl.password`` -> a Java ``sasl.jaas.config`` entry for ``mechanism``."""
    module = _LOGIN_MODULES.get(mechanism.upper())
    if module is None:
        raise ConfigError(
            "kafka.client.sasl.username",
            f"user and password need sasl.mechanism PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512, got {mechanism!r}",
            "set sasl.mechanism, or for OAUTHBEARER / GSSAPI use their own settings",
        )
    return f'{module} required username="{_escape_jaas(username)}" password="{_escape_jaas(password)}";'


def spark_options(bootstrap_servers: str, settings: Mapping[str, str]) -> dict[str, str]:
    """Client ``settings`` written in either client's spelling -> Spark ``kafka.*`` options, Java-spelled.

    The options every Kafka reader and writer gets, with either connector, and what :func:`client_config`
    reads back for streamhydro's own clients.
    """
    given = {str(k).lower().removeprefix(KAFKA_PREFIX): str(v) for k, v in settings.items()}
    java: dict[str, str] = {}
    user, password = given.pop("sasl.username", None), given.pop("sasl.password", None)
    if (user is None) != (password is None):
        missing = "sasl.password" if password is None else "sasl.username"
        raise ConfigError(f"kafka.client.{missing}", "is missing while the other half of the login is set", f"set {missing} too")
    if given.pop("ssl.truststore.type", "PEM").upper() != "PEM" and "ssl.truststore.location" in given:
        raise ConfigError(
            "kafka.client.ssl.truststore.location",
            "is a JKS/PKCS#12 truststore, which streamhydro's clients (librdkafka) cannot read",
            "put the CA certificates in a PEM file and set ssl.ca.location (both connectors read it)",
        )
    for key, value in given.items():
        if key == "ssl.ca.location" or key == "ssl.truststore.location":
            java["ssl.truststore.type"] = "PEM"
            java["ssl.truststore.location"] = value
        elif key in _FROM_LIBRDKAFKA:
            target, convert = _FROM_LIBRDKAFKA[key]
            java[target] = _converted(f"kafka.client.{key}", convert, value)
        else:
            java[key] = value
    if user is not None:
        if "sasl.jaas.config" in java:
            raise ConfigError("kafka.client.sasl.jaas.config", "is set together with sasl.username / sasl.password", "keep one of the two")
        java["sasl.jaas.config"] = jaas_entry(java.get("sasl.mechanism", "PLAIN"), user, password)
    return {BOOTSTRAP: bootstrap_servers, **{KAFKA_PREFIX + key: value for key, value in java.items()}}


def _converted(key: str, convert, value: str) -> str:
    try:
        return convert(value)
    except ValueError as exc:
        raise ConfigError(key, f"{value!r} is not a number", f"set {key} to a whole number") from exc


def client_config(options: Mapping[str, str]) -> ClientConfig:
    """Every ``kafka.*`` option, prefix stripped and translated to librdkafka. Requires the bootstrap servers."""
    lowered = _lower(options)
    if not lowered.get(BOOTSTRAP, "").strip():
        raise ConfigError(BOOTSTRAP, "is missing", "set option kafka.bootstrap.servers to host:port[,host:port]")
    settings: dict[str, str] = {}
    pem_truststore = lowered.get("kafka.ssl.truststore.type", "PEM").upper() == "PEM"
    for key, value in lowered.items():
        if not key.startswith(KAFKA_PREFIX):
            continue
        name = key[len(KAFKA_PREFIX) :]
        if name in _JVM_ONLY_KEYS:
            raise ConfigError(key, "is a Java-client setting librdkafka does not have", _JVM_ONLY_KEYS[name])
        if name == "sasl.jaas.config":
            settings.update(translate_jaas(value))
        elif name == "ssl.truststore.location":
            if not pem_truststore:
                raise ConfigError(key, "is a JKS/PKCS#12 truststore, which librdkafka cannot read", "put the CA certificates in a PEM file and set ssl.ca.location")
            settings["ssl.ca.location"] = value
        elif name == "ssl.truststore.type":
            continue
        elif name in _RENAMED_KEYS:
            target, convert, _ = _RENAMED_KEYS[name]
            settings[target] = _converted(key, convert, value)
        else:
            settings[name] = value
    return ClientConfig.of(settings)


def isolation_level(client: ClientConfig) -> str:
    """The input's isolation level (``kafka.client`` ``isolation.level``, read_uncommitted by default), which
    the planner's end offsets and the readers share: read_committed readers stop at the last stable offset,
    so ranges must end there too."""
    level = (client.get(ISOLATION_LEVEL) or READ_UNCOMMITTED).strip().lower()
    if level not in (READ_COMMITTED, READ_UNCOMMITTED):
        raise ConfigError(f"kafka.client.{ISOLATION_LEVEL}", f"{level!r} is not an isolation level", f"use {READ_COMMITTED} or {READ_UNCOMMITTED}")
    return level


def client_for(bootstrap_servers: str, settings: Mapping[str, str] | None = None) -> ClientConfig:
    """librdkafka settings for a client of ``bootstrap_servers`` with ``settings`` in either spelling."""
    return client_config(spark_options(bootstrap_servers, settings or {}))


def check_jvm_options(options: Mapping[str, str], java_names: Collection[str]) -> None:
    """Refuse ``kafka.*`` options the Java Kafka client does not know (``java_names``: its config names).

    The Java client only warns about unknown settings, so without this a librdkafka-only setting given
    to the JVM connector would be dropped silently.
    """
    known = {name.lower() for name in java_names}
    for key in options:
        name = str(key).lower().removeprefix(KAFKA_PREFIX)
        if not str(key).lower().startswith(KAFKA_PREFIX) or name in known:
            continue
        fix = _LIBRDKAFKA_ONLY_FIXES.get(
            name, "use the Java client's name for it (see Kafka's client configs), or source = \"python\" to keep it"
        )
        raise ConfigError(f"kafka.client.{name}", "has no equivalent in the Java Kafka client that Spark's JVM connector uses", fix)


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


# The reader options that choose what to read, in Spark's spelling; exactly one is set.
SUBSCRIPTION_OPTIONS = ("subscribe", "subscribePattern", "assign")


def parse_subscription(options: Mapping[str, str], names: Mapping[str, str] | None = None) -> Subscription:
    """The subscription that ``options`` (subscribe, subscribePattern, assign, in any case) set; a ConfigError
    for none, several, a bad regex or bad JSON. Errors name each option as ``names`` does (the settings keys,
    when the configuration is checked), by default as Spark does."""
    lowered = _lower(options)
    shown = {kind: (names or {}).get(kind, kind) for kind in SUBSCRIPTION_OPTIONS}
    given = [kind for kind in SUBSCRIPTION_OPTIONS if lowered.get(kind.lower(), "").strip()]
    if len(given) != 1:
        subscribe, pattern, assign = shown.values()
        raise ConfigError(
            subscribe,
            f"exactly one of {subscribe}, {pattern}, {assign} must be set, got {[shown[kind] for kind in given] or 'none'}",
            f'set exactly one: {subscribe} = "topic1,topic2", {pattern} = "regex" or '
            f"{assign} = '{{\"topic\": [0, 1]}}'",
        )
    kind = given[0]
    value = lowered[kind.lower()]
    if kind == "subscribe":
        topics = tuple(t.strip() for t in value.split(",") if t.strip())
        return Subscription("subscribe", topics=topics)
    if kind == "subscribePattern":
        try:
            re.compile(value)
        except re.error as exc:
            raise ConfigError(shown[kind], f"{value!r} is not a regular expression ({exc})", "fix the regex") from exc
        return Subscription("subscribePattern", pattern=value)
    fix = 'give a JSON object of topic to partition list, e.g. {"events":[0,1]}'
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise ConfigError(shown[kind], f"{value!r} is not JSON ({exc})", fix) from exc
    if not isinstance(parsed, dict) or not all(
        isinstance(parts, list) and all(isinstance(p, int) and p >= 0 for p in parts) for parts in parsed.values()
    ):
        raise ConfigError(shown[kind], f"{value!r} is not an object of topic to partition numbers", fix)
    return Subscription("assign", assigned=tuple(sorted((t, p) for t, parts in parsed.items() for p in parts)))


@dataclass(frozen=True)
class StartingOffsets:
    """``earliest``, ``latest``, or specific offsets per topic-partition (-2 earliest, -1 latest)."""

    kind: Literal["earliest", "latest", "specific"]
    specific: tuple[tuple[TopicPartitionKey, int], ...] = ()


def parse_starting_offsets(value: str | None, key: str = "startingOffsets") -> StartingOffsets:
    """``startingOffsets`` (None: latest, Spark's default for streams); a ConfigError naming ``key``."""
    if value is None or value.strip().lower() == "latest":
        return StartingOffsets("latest")
    if value.strip().lower() == "earliest":
        return StartingOffsets("earliest")
    fix = 'use earliest, latest, or JSON like {"topic":{"0":23,"1":-2}} (-2 earliest, -1 latest)'
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise ConfigError(key, f"{value!r} is neither earliest, latest nor JSON", fix) from exc
    try:
        offsets = offsets_from_json(parsed)
    except (TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(key, f"{value!r} is not an object of topic to partition offsets", fix) from exc
    if any(offset < EARLIEST for offset in offsets.values()):
        raise ConfigError(key, f"{value!r} holds an offset below -2", fix)
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


@dataclass(frozen=True)
class SourceOptions:
    """Everything the streaming reader needs, parsed once on the driver.

    ``end_offsets``: ``listOffsets`` (default) trusts ListOffsets(latest), as Spark's connector does, right
    on Apache Kafka; ``fetch`` takes each partition's end from a Fetch response's high watermark, one fetch
    per micro-batch dearer, for brokers whose ListOffsets answer is wrong (Tansu, where trusting it stalls
    the stream short of the end).
    """

    client: ClientConfig
    subscription: Subscription
    starting: StartingOffsets
    max_offsets_per_trigger: int | None
    fail_on_data_loss: bool
    poll_timeout_ms: int
    end_offsets: EndOffsets

    @property
    def group_id(self) -> str | None:
        return self.client.get(GROUP_ID)


def parse_source_options(options: Mapping[str, str]) -> SourceOptions:
    lowered = _lower(options)
    for key, fix in _UNSUPPORTED_SOURCE_OPTIONS.items():
        if key in lowered:
            raise ConfigError(key, "is not supported by streamhydro's Kafka source", fix)
    return SourceOptions(
        client=client_config(options),
        subscription=parse_subscription(options),
        starting=parse_starting_offsets(lowered.get("startingoffsets")),
        max_offsets_per_trigger=_positive_int(lowered, "maxoffsetspertrigger", "maxOffsetsPerTrigger"),
        fail_on_data_loss=_bool(lowered, "failondataloss", "failOnDataLoss", default=True),
        poll_timeout_ms=_positive_int(lowered, "kafkaconsumer.polltimeoutms", "kafkaConsumer.pollTimeoutMs") or 120_000,
        end_offsets=parse_choice(EndOffsets, lowered.get("endoffsetsfrom", EndOffsets.LIST_OFFSETS), "endOffsetsFrom"),
    )


def check_no_transactional_id(client: ClientConfig, key: str) -> None:
    """Refuse a ``transactional.id`` among the client settings (``key``: where it was given): streamhydro
    chooses transactional ids itself, one per input partition, and only for exactly-once delivery."""
    if client.get(TRANSACTIONAL_ID) is not None:
        raise ConfigError(
            key,
            "asks for transactions, which streamhydro opens itself (a transactional id per input partition) and only "
            f"with kafka.delivery = {Delivery.EXACTLY_ONCE}",
            f'remove it; for exactly-once delivery run streamhydro serve with kafka.delivery = "{Delivery.EXACTLY_ONCE}"',
        )


# What each producer refuses a record over, by default (Java: max.request.size, buffer.memory; librdkafka:
# message.max.bytes, queue.buffering.max.kbytes in KiB).
JAVA_MAX_REQUEST_SIZE = 1_048_576
JAVA_BUFFER_MEMORY = 33_554_432
LIBRDKAFKA_MESSAGE_MAX_BYTES = 1_000_000
LIBRDKAFKA_QUEUE_MAX_KBYTES = 1_048_576
# The smallest record limit streamhydro runs with: under it a dead letter stripped of key, value and the
# record's headers might not fit its origin and error headers (streamhydro.payload.limits).
MIN_RECORD_LIMIT = 8192


def max_record_bytes(options: Mapping[str, str], jvm: bool) -> int:
    """The largest record the sink's producer accepts, from the ``kafka.*`` options (either spelling, as
    :func:`spark_options` made them): the Java producer's for Spark's JVM sink (``jvm``), else librdkafka's.

    Sizes are counted as :func:`streamhydro.payload.limits.record_sizes` counts them; each limit is the
    smallest of the producer's settings that refuse one record (the request size and the send buffer).
    """
    if jvm:
        lowered = _lower(options)
        request = _converted("kafka.client.max.request.size", int, lowered.get("kafka.max.request.size", str(JAVA_MAX_REQUEST_SIZE)))
        memory = _converted("kafka.client.buffer.memory", int, lowered.get("kafka.buffer.memory", str(JAVA_BUFFER_MEMORY)))
        return _at_least_minimum(min(request, memory), "max.request.size")
    client = client_config(options)
    message = _converted("kafka.client.message.max.bytes", int, client.get("message.max.bytes") or str(LIBRDKAFKA_MESSAGE_MAX_BYTES))
    queue = _converted(
        "kafka.client.queue.buffering.max.kbytes", int, client.get("queue.buffering.max.kbytes") or str(LIBRDKAFKA_QUEUE_MAX_KBYTES)
    )
    return _at_least_minimum(min(message, queue * 1024), "message.max.bytes")


def _at_least_minimum(limit: int, name: str) -> int:
    if limit < MIN_RECORD_LIMIT:
        raise ConfigError(
            f"kafka.client.{name}",
            f"lets the producer send records of at most {limit} bytes, too few for a dead letter's origin and error headers",
            f"set it to {MIN_RECORD_LIMIT} or more (the default is {LIBRDKAFKA_MESSAGE_MAX_BYTES})",
        )
    return limit
