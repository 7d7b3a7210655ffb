"""Configuration of ``streamhydro serve``: a TOML file, checked in full at start.

Runs on the driver, once, before Spark starts. This is the one place where settings are read
from the outside world (the file and the environment) and the one place that translates them
to Spark and Kafka option keys; everything downstream receives frozen dataclasses.

Secrets stay out of the file: any string value may be ``"${NAME}"``, replaced by the environment
variable NAME (an unset variable is an error naming the key). Any scalar key can also be
overridden by an environment variable ``STREAMHYDRO_<SECTION>_<KEY>`` in upper case, e.g.
``STREAMHYDRO_KAFKA_BOOTSTRAP_SERVERS``. Values of keys that look secret are masked in ``repr``.

A key with a few allowed values holds an enum member (``kafka.source``, ``kafka.delivery``,
``kafka.end_offsets_from``, ``payload.format``, ``model.version``), parsed once here
(:func:`streamhydro.choices.parse_choice`); the file and the reference hold the plain values. Each
section checks itself, with the parsers the Kafka connector applies to its options, so one rule has
one implementation and its error names the key where the value was written. ``serve`` and ``train``
share :class:`SparkSection` (and its GPU policy) and :class:`MetricsSection`.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from streamhydro.choices import allowed, parse_choice
from streamhydro.errors import ConfigError
from streamhydro.kafka.options import (
    TRANSACTIONAL_ID,
    ClientConfig,
    Connector,
    Delivery,
    EndOffsets,
    Subscription,
    check_no_transactional_id,
    client_config,
    isolation_level,
    max_record_bytes,
    parse_starting_offsets,
    parse_subscription,
    spark_options,
)
from streamhydro.payload import PayloadFormat
from streamhydro.registry import Selector, parse_version
from streamhydro.secrets import masked, remember
from streamhydro.spark import CLUSTER, Master, check_gpu_master

ENV_PREFIX = "STREAMHYDRO_"
PIPELINE_AUTO = "auto"
_ENV_REF = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")


def doc(text: str, **kwargs: Any) -> Any:
    """A dataclass field with its documentation, used for errors and the README reference."""
    return dataclasses.field(metadata={"doc": text}, **kwargs)


class Masked(dict):
    """A dict of client settings whose secret values are hidden in ``repr`` (:mod:`streamhydro.secrets`)."""

    def __repr__(self) -> str:
        return repr(masked(self))


@dataclasses.dataclass(frozen=True)
class SparkSection:
    """The [spark] keys ``serve`` and ``train`` share, and their checks: one GPU policy for both.

    A subclass names the GPUs its command asks for (:meth:`gpus`); a master that cannot schedule them
    (``local[N]``) is refused, in the file's check when the file names the master and again once
    spark-submit's master is known (:meth:`check_master`).
    """

    master: str = doc(
        "Spark master URL: local[N], local-cluster[N,C,MB], spark://, yarn, k8s://; empty = spark-submit's --master.",
        default="local[2]",
    )
    app_name: str = doc("Spark application name.", default="streamhydro")
    conf: Mapping[str, str] = doc("Extra Spark configuration passed as is.", default_factory=dict)

    def gpus(self) -> tuple[str, float]:
        """The key that asks for GPUs and how many it asks for (0: none)."""
        raise NotImplementedError

    def check(self) -> Master | None:
        """The master the file names (None: spark-submit's, known only once Spark runs), checked."""
        master = Master.parse(self.master) if self.master else None
        if master is not None:
            self.check_master(master)
        return master

    def check_master(self, master: Master) -> None:
        """Refuse GPUs that ``master`` cannot schedule (:func:`streamhydro.spark.check_gpu_master`)."""
        key, amount = self.gpus()
        check_gpu_master(master, amount, key)


@dataclasses.dataclass(frozen=True)
class SparkSettings(SparkSection):
    checkpoint_location: str = doc(
        "Where the query keeps offsets and state; a restart resumes from here.", default="var/checkpoints/serve"
    )
    trigger_interval: str = doc("Micro-batch trigger interval, e.g. '0 seconds' (as fast as possible), '5 seconds'.", default="0 seconds")
    executor_gpus: int = doc("GPUs per executor (spark.executor.resource.gpu.amount); 0 = no GPUs.", default=0)
    task_gpus: float = doc("GPUs per inference task; a fraction shares a GPU (0.25 = four tasks per GPU).", default=0.0)
    gpu_discovery_script: str = doc("Script printing the executor's GPU addresses (deploy/gpu/get_gpus_resources.sh).", default="")

    def gpus(self) -> tuple[str, float]:
        return "spark.executor_gpus", self.executor_gpus

    def check(self) -> Master | None:
        check_gpu_amounts(self.executor_gpus, self.task_gpus)
        if self.task_gpus and not self.executor_gpus:
            raise ConfigError("spark.executor_gpus", "is 0 while spark.task_gpus asks for GPUs", "set spark.executor_gpus to the GPUs per executor")
        master = super().check()
        if self.executor_gpus and not self.gpu_discovery_script and (master is None or master.kind == CLUSTER):
            raise ConfigError("spark.gpu_discovery_script", "is empty while GPUs are requested", "point it at deploy/gpu/get_gpus_resources.sh")
        return master


@dataclasses.dataclass(frozen=True)
class KafkaSettings:
    bootstrap_servers: str = doc("Kafka bootstrap servers, host:port[,host:port].", default="127.0.0.1:9092")
    subscribe: str = doc("Input topics, comma-separated (one of subscribe / subscribe_pattern / assign).", default="events")
    subscribe_pattern: str = doc("Input topic regex (instead of subscribe).", default="")
    assign: str = doc("Input partitions as JSON, e.g. '{\"events\": [0, 1]}' (instead of subscribe).", default="")
    starting_offsets: str = doc("Where a new query starts: earliest | latest | JSON per partition.", default="earliest")
    max_offsets_per_trigger: int = doc("At most this many records per micro-batch; 0 = no limit.", default=200_000)
    fail_on_data_loss: bool = doc("Fail the query when offsets it should read are gone (retention).", default=True)
    output_topic: str = doc("Topic the predictions go to.", default="predictions")
    dead_letter_topic: str = doc("Topic records that cannot be scored go to, with their origin in headers.", default="predictions-dlq")
    source: Connector = doc(
        "Kafka connector: builtin (Spark's JVM source and sink around the scoring; spark-sql-kafka, resolved by "
        "`streamhydro jars`) or python (streamhydro's: each task reads, scores and writes its range in one Python "
        "worker; needed for exactly_once and for Tansu).",
        default=Connector.BUILTIN,
    )
    delivery: Delivery = doc(
        "Delivery guarantee of predictions and dead letters: at_least_once (a micro-batch replayed after a crash "
        "is written again, with the same idempotency_key) or exactly_once (each micro-batch's range of each input "
        "partition written in bounded Kafka transactions that a retry resumes; needs source = python, a broker with transactions such as Apache Kafka 3 or later, "
        "and consumers reading with isolation.level = read_committed). See docs/delivery.md.",
        default=Delivery.AT_LEAST_ONCE,
    )
    end_offsets_from: EndOffsets = doc(
        "How streamhydro's source learns where partitions end: listOffsets (what Apache Kafka and Spark's "
        "connector use) or fetch (a Fetch response's high watermark, for brokers whose ListOffsets is wrong, "
        "such as Tansu).",
        default=EndOffsets.LIST_OFFSETS,
    )
    client: Mapping[str, str] = doc(
        "Kafka client settings for every client, written once in the Java or the librdkafka spelling and "
        "translated for each connector, e.g. security.protocol, sasl.mechanism, sasl.username, "
        "sasl.password = \"${KAFKA_PASSWORD}\" (or sasl.jaas.config), ssl.ca.location.",
        default_factory=Masked,
    )

    def client_options(self) -> dict[str, str]:
        """Options every Spark Kafka reader and writer gets: bootstrap servers and the client settings,
        Java-spelled (:func:`streamhydro.kafka.options.spark_options`)."""
        return spark_options(self.bootstrap_servers, self.client)

    def librdkafka(self) -> ClientConfig:
        """The settings of streamhydro's own clients (admin, load generator, readers of the output)."""
        return client_config(self.client_options())

    def max_record_bytes(self) -> int:
        """The largest output record the sink's producer accepts (:func:`streamhydro.kafka.options.max_record_bytes`)."""
        return max_record_bytes(self.client_options(), jvm=self.source == Connector.BUILTIN)

    def source_options(self) -> dict[str, str]:
        """The reader's options, named as Spark's Kafka source names them (same for both connectors)."""
        options = self.client_options()
        if self.subscribe:
            options["subscribe"] = self.subscribe
        elif self.subscribe_pattern:
            options["subscribePattern"] = self.subscribe_pattern
        else:
            options["assign"] = self.assign
        options["startingOffsets"] = self.starting_offsets
        options["failOnDataLoss"] = "true" if self.fail_on_data_loss else "false"
        options["includeHeaders"] = "true"
        if self.end_offsets_from != EndOffsets.LIST_OFFSETS:
            options["endOffsetsFrom"] = self.end_offsets_from
        if self.max_offsets_per_trigger:
            options["maxOffsetsPerTrigger"] = str(self.max_offsets_per_trigger)
        return options

    def subscription(self) -> Subscription:
        """What the input is, parsed by the source's parser; errors name the settings keys."""
        return parse_subscription(
            {"subscribe": self.subscribe, "subscribePattern": self.subscribe_pattern, "assign": self.assign},
            {"subscribe": "kafka.subscribe", "subscribePattern": "kafka.subscribe_pattern", "assign": "kafka.assign"},
        )

    def check(self) -> None:
        """Every rule the connectors apply to these settings, by the same parsers, naming the settings keys."""
        subscription = self.subscription()
        parse_starting_offsets(self.starting_offsets, "kafka.starting_offsets")
        if self.delivery == Delivery.EXACTLY_ONCE and self.source == Connector.BUILTIN:
            raise ConfigError(
                "kafka.delivery",
                f"{Delivery.EXACTLY_ONCE} needs streamhydro's connector: Spark's built-in Kafka sink has no transactions",
                f'set source = "{Connector.PYTHON}" (or delivery = "{Delivery.AT_LEAST_ONCE}" to keep the built-in connector)',
            )
        if self.end_offsets_from == EndOffsets.FETCH and self.source == Connector.BUILTIN:
            raise ConfigError(
                "kafka.end_offsets_from",
                f"{EndOffsets.FETCH} needs streamhydro's source; Spark's JVM connector always trusts ListOffsets",
                f'set source = "{Connector.PYTHON}" (or end_offsets_from = "{EndOffsets.LIST_OFFSETS}" on a broker that answers it right)',
            )
        check_no_transactional_id(self.librdkafka(), f"kafka.client.{TRANSACTIONAL_ID}")
        if self.max_offsets_per_trigger < 0:
            raise ConfigError("kafka.max_offsets_per_trigger", f"must be >= 0, got {self.max_offsets_per_trigger}", "use 0 for no limit")
        if self.output_topic == self.dead_letter_topic:
            raise ConfigError("kafka.dead_letter_topic", "is the same topic as kafka.output_topic", "give dead letters their own topic")
        check_no_feedback(self, subscription)
        self.max_record_bytes()  # refuses a producer limit too small for a dead letter's origin and error headers
        isolation_level(self.librdkafka())  # the input's, for both connectors; refuses a value neither client knows


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    registry: str = doc("Model registry directory.", default="models")
    name: str = doc("Model name in the registry.", default="breast_cancer")
    version: Selector | int = doc(f"Version to serve: {allowed(Selector)}, or a number (pinned).", default=Selector.PROMOTED)
    refresh_seconds: float = doc("How often the registry is checked for a new version, at micro-batch boundaries.", default=10.0)

    def check(self) -> None:
        if self.refresh_seconds <= 0:
            raise ConfigError("model.refresh_seconds", f"must be > 0, got {self.refresh_seconds}", "e.g. 10")


@dataclasses.dataclass(frozen=True)
class PayloadSettings:
    """How input record values are encoded. Picklable: it travels to executors in the scoring plan."""

    format: PayloadFormat = doc(
        f"Input value format: {allowed(PayloadFormat)}. json: one object per record; avro / protobuf: "
        "binary, with schema_registry_url (Confluent wire format) or a fixed schema; tensor: the raw "
        "little-endian float32 row of a single-input model.",
        default=PayloadFormat.JSON,
    )
    schema_registry_url: str = doc(
        "avro / protobuf: Confluent-compatible schema registry URL; values are in the Confluent wire format "
        "(byte 0, 4-byte big-endian schema id, protobuf message indexes, the record) and schemas are fetched "
        "by id, cached per Python worker.",
        default="",
    )
    schema_registry_client: Mapping[str, str] = doc(
        "Schema registry client settings (confluent-kafka's SchemaRegistryClient keys), e.g. "
        'basic.auth.user.info = "${SR_AUTH}", ssl.ca.location; secrets are masked.',
        default_factory=Masked,
    )
    schema: str = doc(
        "avro / protobuf without a registry: path of an .avsc or .proto file, readable where the driver and "
        "the executors run; values are then the bare encoded record, no wire header.",
        default="",
    )
    message: str = doc("protobuf: fully qualified message name of the events; empty = the schema's first message.", default="")
    max_value_bytes: int = doc(
        "Largest record value decoded, in bytes; a larger one goes to the dead-letter topic undecoded, "
        "without its value (error class ValueTooLarge). Tensor values are always exactly the model's row size.",
        default=1_048_576,
    )

    def check(self) -> None:
        if self.max_value_bytes < 1:
            raise ConfigError("payload.max_value_bytes", f"must be >= 1, got {self.max_value_bytes}", "e.g. 1048576 (1 MiB)")
        schema_formats = (PayloadFormat.AVRO, PayloadFormat.PROTOBUF)
        if self.format in schema_formats:
            if bool(self.schema_registry_url) == bool(self.schema):
                raise ConfigError(
                    "payload.schema_registry_url",
                    f"{self.format} needs exactly one of payload.schema_registry_url and payload.schema",
                    "set schema_registry_url for values in the Confluent wire format, or schema to the path of a "
                    f"{'.avsc' if self.format == PayloadFormat.AVRO else '.proto'} file for bare values",
                )
            if self.schema and not Path(self.schema).is_file():
                raise ConfigError("payload.schema", f"{self.schema!r} is not a file", "give the path of the schema file")
        else:
            for key in ("schema_registry_url", "schema", "message"):
                if getattr(self, key):
                    raise ConfigError(
                        f"payload.{key}", f"is only read for {' and '.join(schema_formats)}, not {self.format}",
                        'remove it, or set format = "avro" / "protobuf"',
                    )
            if self.schema_registry_client:
                raise ConfigError("payload.schema_registry_client", f"is only read with a schema registry, not for {self.format}", "remove it")
        if self.message and self.format != PayloadFormat.PROTOBUF:
            raise ConfigError("payload.message", f"names a protobuf message, but format is {self.format}", "remove it")


@dataclasses.dataclass(frozen=True)
class InferenceSettings:
    providers: tuple[str, ...] = doc(
        "ONNX Runtime execution providers in preference order.", default=("CUDAExecutionProvider", "CPUExecutionProvider")
    )
    batch_size: int = doc("Rows per ONNX Runtime call, independent of Arrow batch size.", default=4096)
    pipeline_depth: int | str = doc(
        "Batches in flight between decode, transfer, compute and encode; 0 = sequential; auto = 2 for a task "
        "on a GPU and 0 on the CPU, where compute shares the cores with decoding and pipelining measured slower.",
        default=PIPELINE_AUTO,
    )
    intra_op_threads: int = doc("ONNX Runtime intra-op threads per task; 0 = the task's CPUs.", default=0)
    gpu_mem_limit_mb: int = doc(
        "GPU memory per session in MiB (its arena plus the engine's input buffers); 0 = the task's share: "
        "spark.task_gpus x the GPU's memory x 0.8.",
        default=0,
    )
    allow_tf32: bool = doc(
        "Let the CUDA provider use TF32 for float32 matrix products: faster on Ampere and later GPUs, but scores "
        "then agree with the CPU to about three decimals (docs/inference.md, Precision).",
        default=False,
    )
    allow_cpu_fallback: bool = doc(
        "When Spark assigned a GPU but ONNX Runtime cannot use it (CPU build installed, CUDA libraries missing), "
        "score on the CPU with a warning and a metric per batch instead of failing the task (and serve's start).",
        default=False,
    )
    tensorrt_cache_dir: str = doc(
        "Where the TensorRT provider keeps the engines it builds (one build per model and batch-size profile); "
        "\"\" = streamhydro-tensorrt under the executors' temp dir.",
        default="",
    )

    def check(self) -> None:
        if self.batch_size < 1:
            raise ConfigError("inference.batch_size", f"must be >= 1, got {self.batch_size}", "e.g. 4096")
        pipeline_depth(self)
        if not self.providers:
            raise ConfigError("inference.providers", "is empty", 'e.g. ["CPUExecutionProvider"]')


@dataclasses.dataclass(frozen=True)
class MetricsSection:
    """The [metrics] keys ``serve`` and ``train`` share: where an endpoint binds, and its checks."""

    host: str = doc("Address the metrics endpoint binds.", default="127.0.0.1")
    port: int = doc("Port of the metrics endpoint; 0 = any free port.", default=9108)

    def check(self, ports: int = 1) -> None:
        """``ports``: how many endpoints take consecutive ports from ``port`` (train: one per rank)."""
        if not self.host:
            raise ConfigError("metrics.host", "is empty", 'e.g. "127.0.0.1", or "0.0.0.0" to be scraped from other hosts')
        if not 0 <= self.port <= 65536 - ports:
            endpoints = "" if ports == 1 else f" (+ rank, for all {ports} ranks)"
            raise ConfigError(
                "metrics.port", f"{self.port}{endpoints} is not a port", f"use 1-{65536 - ports}, or 0 for any free port"
            )


@dataclasses.dataclass(frozen=True)
class MetricsSettings(MetricsSection):
    enabled: bool = doc("Serve Prometheus metrics.", default=True)
    certfile: str = doc("TLS certificate for the endpoint (with keyfile); empty = plain HTTP.", default="")
    keyfile: str = doc("TLS private key for the endpoint.", default="")
    multiprocess_dir: str = doc("Directory for the Python workers' metric files, emptied at start.", default="var/metrics")

    def check(self, ports: int = 1) -> None:
        super().check(ports)
        if bool(self.certfile) != bool(self.keyfile):
            raise ConfigError("metrics.keyfile", "TLS needs both metrics.certfile and metrics.keyfile", "set both, or neither")


@dataclasses.dataclass(frozen=True)
class Config:
    spark: SparkSettings = dataclasses.field(default_factory=SparkSettings)
    kafka: KafkaSettings = dataclasses.field(default_factory=KafkaSettings)
    model: ModelSettings = dataclasses.field(default_factory=ModelSettings)
    payload: PayloadSettings = dataclasses.field(default_factory=PayloadSettings)
    inference: InferenceSettings = dataclasses.field(default_factory=InferenceSettings)
    metrics: MetricsSettings = dataclasses.field(default_factory=MetricsSettings)

    def replace(self, **sections: Mapping[str, Any]) -> "Config":
        """A copy with some keys of some sections changed, checked like the file."""
        changed = {
            name: _build(type(getattr(self, name)), {**_as_dict(getattr(self, name)), **values}, name)
            for name, values in sections.items()
        }
        return _validated(dataclasses.replace(self, **changed))


def load(path: str | os.PathLike[str] | None, environ: Mapping[str, str] | None = None) -> Config:
    """Read, override from the environment, check. ``path=None`` gives the defaults."""
    environ = os.environ if environ is None else environ
    raw = read_toml(path) if path is not None else {}
    return from_mapping(raw, environ)


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed TOML file, or a ConfigError naming the file and what is wrong with it."""
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise ConfigError("--config", f"file {path} does not exist", "pass the path of a TOML file") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--config", f"{path} is not valid TOML ({exc})", "fix the syntax at the position shown") from exc


def from_mapping(raw: Mapping[str, Any], environ: Mapping[str, str]) -> Config:
    return _validated(Config(**build_sections(Config, raw, environ)))


def build_sections(root: type, raw: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Each section of the dataclass ``root`` built from ``raw``: unknown keys rejected, environment
    overrides applied, ``${ENV}`` references resolved, values checked against the field types."""
    sections = {f.name: f.type for f in dataclasses.fields(root)}
    _reject_unknown(raw, sections, "")
    built = {}
    for name in sections:
        cls = typing.get_type_hints(root)[name]
        values = dict(raw.get(name, {}))
        if not isinstance(raw.get(name, {}), Mapping):
            raise ConfigError(name, "must be a table", f"write it as [{name}]")
        _apply_environment(name, cls, values, environ)
        values = {k: _interpolate(f"{name}.{k}", v, environ) for k, v in values.items()}
        built[name] = _build(cls, values, name)
    return built


def reference() -> list[tuple[str, str, str]]:
    """Every key as (dotted name, default, documentation), for ``--help`` and the README."""
    rows = []
    hints = typing.get_type_hints(Config)
    for section in dataclasses.fields(Config):
        cls = hints[section.name]
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((f"{section.name}.{f.name}", json.dumps(_jsonable(default)), f.metadata["doc"]))
    return rows


REFERENCE_HEADER = """# Configuration reference

Generated from `streamhydro/config.py` (`python -c "from streamhydro.config import reference_markdown; \\
print(reference_markdown(), end='')" > docs/configuration.md`); a test keeps it in step. `streamhydro serve
--config FILE` reads TOML with these sections; missing keys take their defaults, unknown keys and bad values
stop the start naming the key and the fix. Any key can be overridden from the environment as
`STREAMHYDRO_<SECTION>_<KEY>`, and any string value may be `"${NAME}"` to read the environment variable NAME.

| key | default | meaning |
|---|---|---|
"""


def reference_markdown() -> str:
    """``docs/configuration.md``: every key as a Markdown table row."""
    rows = "".join(f"| `{name}` | `{default}` | {text} |\n" for name, default, text in reference())
    return REFERENCE_HEADER + rows


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Mapping):
        return dict(value)
    return value


def _as_dict(section: Any) -> dict[str, Any]:
    return {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}


def _reject_unknown(raw: Mapping[str, Any], known: Mapping[str, Any], prefix: str) -> None:
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            fix = f"did you mean '{prefix}{close[0]}'?" if close else f"known keys: {', '.join(prefix + k for k in known)}"
            raise ConfigError(f"{prefix}{key}", "unknown key", fix)


def _apply_environment(section: str, cls: type, values: dict[str, Any], environ: Mapping[str, str]) -> None:
    for f in dataclasses.fields(cls):
        name = f"{ENV_PREFIX}{section}_{f.name}".upper()
        if name in environ:
            values[f.name] = environ[name]


def _interpolate(key: str, value: Any, environ: Mapping[str, str]) -> Any:
    if isinstance(value, Mapping):
        return {k: _interpolate(f"{key}.{k}", v, environ) for k, v in value.items()}
    if isinstance(value, str):
        match = _ENV_REF.match(value)
        if match:
            if match.group(1) not in environ:
                raise ConfigError(key, f"refers to environment variable {match.group(1)}, which is not set", f"export {match.group(1)}=...")
            return environ[match.group(1)]
    return value


def _build(cls: type, values: Mapping[str, Any], section: str) -> Any:
    hints = typing.get_type_hints(cls)
    _reject_unknown(values, hints, f"{section}.")
    kwargs = {}
    for name, value in values.items():
        kwargs[name] = _coerce(f"{section}.{name}", hints[name], value)
    return cls(**kwargs)


def _coerce(key: str, hint: Any, value: Any) -> Any:
    """Check ``value`` against the field type; strings from the environment are converted."""
    origin = typing.get_origin(hint)
    if isinstance(hint, type) and issubclass(hint, enum.StrEnum):
        return parse_choice(hint, value, key)
    if hint == Selector | int:
        return parse_version(value, key)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(key, f"expected true or false, got {value!r}", "write true or false")
    if hint in (int, float):
        if isinstance(value, bool):
            raise ConfigError(key, f"expected a number, got {value!r}", "write a number")
        try:
            number = hint(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(key, f"expected {hint.__name__}, got {value!r}", f"write a {hint.__name__}") from exc
        if hint is int and isinstance(value, float) and value != number:
            raise ConfigError(key, f"expected a whole number, got {value!r}", "write an integer")
        return number
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}", "quote the value")
        return value
    if origin is tuple:
        item = typing.get_args(hint)[0]
        if isinstance(value, tuple):
            value = list(value)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if item is str and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
            raise ConfigError(key, f"expected a list of strings, got {value!r}", 'write ["A", "B"]')
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list of {item.__name__}, got {value!r}", "write [1, 2]")
        return tuple(_coerce(f"{key}[{i}]", item, v) for i, v in enumerate(value))
    if origin in (Mapping, dict) or hint in (dict,) or isinstance(origin, type) and issubclass(origin, Mapping):
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ConfigError(key, f"expected a table, got {value!r}", "write a TOML table or a JSON object") from exc
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"expected a table, got {value!r}", "write a TOML table")
        settings = Masked({str(k): _scalar_str(f"{key}.{k}", v) for k, v in value.items()})
        remember(settings)
        return settings
    if isinstance(hint, types.UnionType):
        return value
    raise TypeError(f"unsupported config type {hint!r} for {key}")


def _scalar_str(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value)
    raise ConfigError(key, f"expected a string, number or boolean, got {value!r}", "write a scalar value")


def _validated(config: Config) -> Config:
    """The file's and the environment's values, checked once: each section checks itself (``check()``)."""
    for section in dataclasses.fields(config):
        getattr(config, section.name).check()
    return config


def check_no_feedback(kafka: KafkaSettings, subscription: Subscription) -> None:
    """Refuse an input that reads what serve writes: every prediction would be scored again, forever.

    ``subscription`` is ``kafka``'s, resolved as the source resolves it (:func:`streamhydro.kafka.options.parse_subscription`:
    topic list, a regex that must match the whole topic name, or assigned partitions).
    """
    key = next(f"kafka.{name}" for name in ("subscribe", "subscribe_pattern", "assign") if getattr(kafka, name))
    for written in ("output_topic", "dead_letter_topic"):
        topic = getattr(kafka, written)
        if subscription.matches(topic):
            how = "matches" if subscription.kind == "subscribePattern" else "names"
            raise ConfigError(
                key,
                f"{how} {topic!r}, the topic kafka.{written} writes to: serve would read its own output and score it again, endlessly",
                f"read only input topics in {key}, or write kafka.{written} to a topic the input does not include",
            )


def pipeline_depth(inference: InferenceSettings) -> int | None:
    """``inference.pipeline_depth`` as a number of batches, None for ``auto``; a ConfigError for anything else."""
    value = inference.pipeline_depth
    if value == PIPELINE_AUTO:
        return None
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdigit():
        raise ConfigError("inference.pipeline_depth", f"{value!r} is not auto or a number of batches >= 0", "use auto, 0 (off) or 2")
    return int(text)


def check_gpu_amounts(executor_gpus: int, task_gpus: float) -> None:
    """GPU amounts Spark can schedule: whole GPUs per executor; per task a whole number or 1/n."""
    if executor_gpus < 0:
        raise ConfigError("spark.executor_gpus", f"must be 0 or more, got {executor_gpus}", "set a whole number of GPUs")
    if task_gpus < 0 or (task_gpus > 1 and task_gpus != int(task_gpus)):
        raise ConfigError(
            "spark.task_gpus",
            f"{task_gpus} is not a valid GPU amount per task",
            "use a fraction 1/n (0.5, 0.25: n tasks share a GPU) or a whole number",
        )
    if 0 < task_gpus < 1 and not math.isclose(1 / task_gpus, round(1 / task_gpus)):
        raise ConfigError("spark.task_gpus", f"{task_gpus} does not divide a GPU evenly", "use 1/n, e.g. 0.5, 0.25 or 0.125")
