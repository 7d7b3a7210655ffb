"""The load generator, ``streamhydro produce``: synthetic events shaped by a model's manifest.

Runs in a client process (the demo runs it in a thread of the driver). Values are generated
vectorised with numpy; a chosen fraction of records is malformed on purpose, cycling through the
kinds of bad input the service must send to the dead-letter topic.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from streamhydro.config import load
from streamhydro.errors import ConfigError, DeliveryError
from streamhydro.kafka.options import ClientConfig
from streamhydro.payload import PayloadFormat
from streamhydro.payload.fields import BOOLEAN, INTS, NUMBER, TEXT, input_fields
from streamhydro.registry import Manifest, Registry, Selector, parse_version

log = logging.getLogger(__name__)

JSON_BAD_KINDS = ("truncated_json", "wrong_type", "missing_feature", "empty_value", "not_json")
TENSOR_BAD_KINDS = ("wrong_tensor_length", "empty_value")
BAD_KINDS = {
    PayloadFormat.JSON: JSON_BAD_KINDS,
    PayloadFormat.TENSOR: TENSOR_BAD_KINDS,
    PayloadFormat.AVRO: ("truncated_record", "trailing_bytes", "empty_value"),
    PayloadFormat.PROTOBUF: ("corrupt_message", "empty_value"),
}
WIRE_BAD_KINDS = ("not_wire_format", "unknown_schema")  # added for avro / protobuf in the wire format
UNKNOWN_SCHEMA_ID = 2**31 - 1  # a schema id no registry hands out this early
VOCABULARY = ("red", "green", "blue", "amber")  # values of a string field whose categories the model does not record
CHUNK = 2000
# How long the last sends may wait for their acknowledgements (a broker may be restarting or stalled).
FLUSH_TIMEOUT_S = 120
# The load generator's producer: idempotent, batching like a busy producer; the user's settings win.
LOAD_GENERATOR_PRODUCER_DEFAULTS = {"enable.idempotence": "true", "acks": "all", "linger.ms": "5", "batch.num.messages": "10000"}


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "produce",
        help="send synthetic events to Kafka (load generator)",
        description="Send events shaped by a model's manifest to a Kafka topic; prints a JSON summary of what was sent.",
    )
    parser.add_argument("--config", metavar="FILE", help="serve's TOML configuration: its [kafka] bootstrap_servers and client settings are used")
    parser.add_argument("--bootstrap-servers", help="Kafka bootstrap servers (default: the config's, else 127.0.0.1:9092)")
    parser.add_argument("--topic", default="events", help="topic to send to (default %(default)s)")
    parser.add_argument("--count", type=int, default=10_000, help="events to send; 0 = until interrupted (default %(default)s)")
    parser.add_argument("--rate", type=float, default=0.0, help="events per second; 0 = as fast as possible (default)")
    add_event_arguments(parser)
    parser.add_argument("--version", default=Selector.PROMOTED, help="latest | promoted | N (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--schema-registry-url",
        help="avro / protobuf: register the schema derived from the model under <topic>-value and send the Confluent "
        "wire format (default: the config's payload.schema_registry_url; none: bare values)",
    )
    parser.add_argument("--write-schema", metavar="FILE", help="avro / protobuf: write the derived schema (.avsc / .proto) here, for payload.schema")
    parser.set_defaults(run=_run)


def add_event_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that shape generated events: shared by ``produce`` and ``demo``."""
    parser.add_argument(
        "--payload", type=PayloadFormat, choices=list(PayloadFormat), default=PayloadFormat.JSON, help="event format (default %(default)s)"
    )
    parser.add_argument("--bad-fraction", type=_fraction, default=0.0, help="fraction of malformed events, 0..1 (default 0)")
    parser.add_argument("--registry", default="models", help="model registry directory (default %(default)s)")
    parser.add_argument("--model", default="breast_cancer", help="model in --registry whose inputs shape the events; demo also takes the path of an ONNX file, "
                        "added to a scratch registry (default %(default)s)")


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction: use a number from 0 to 1")
    return value


def _run(args: argparse.Namespace) -> int:
    manifest = Registry(args.registry).get(args.model, parse_version(args.version, "--version")).manifest
    config = load(args.config)
    kafka = config.kafka
    if args.bootstrap_servers:
        kafka = dataclasses.replace(kafka, bootstrap_servers=args.bootstrap_servers)
    registry_url = args.schema_registry_url if args.schema_registry_url is not None else config.payload.schema_registry_url
    if args.payload not in (PayloadFormat.AVRO, PayloadFormat.PROTOBUF):
        registry_url = ""
    generator = LoadGenerator(
        kafka.librdkafka(), args.topic, manifest, args.payload, args.bad_fraction, seed=args.seed,
        schema_registry_url=registry_url, schema_registry_client=config.payload.schema_registry_client,
    )
    if args.write_schema:
        Path(args.write_schema).write_text(generator.format.schema)
    stop = threading.Event()
    try:
        summary = generator.run(args.count or None, args.rate or None, stop)
    except KeyboardInterrupt:
        stop.set()
        summary = generator.summary()
    finally:
        generator.close()
    print(json.dumps(summary))
    return 0


def feature_stats(manifest: Manifest) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and standard deviation of the model's flattened inputs.

    Taken from the manifest's ``provenance.feature_stats`` when the trainer recorded them, so
    generated events look like the training data; standard normal otherwise.
    """
    width = sum(spec.width for spec in manifest.inputs)
    stats = manifest.provenance.get("feature_stats", {})
    mean = np.asarray(stats.get("mean", np.zeros(width)), dtype=np.float64)
    std = np.asarray(stats.get("std", np.ones(width)), dtype=np.float64)
    if mean.shape != (width,) or std.shape != (width,):
        return np.zeros(width), np.ones(width)
    return mean, std


def categories(manifest: Manifest, path: str) -> list[str]:
    """The values a string field takes: ``provenance.categories[path]`` when the model records them
    (the categories its encoder was fitted on), else a small fixed vocabulary."""
    known = manifest.provenance.get("categories", {}).get(path)
    return [str(v) for v in known] if isinstance(known, list) and known else list(VOCABULARY)


@dataclasses.dataclass(frozen=True)
class EventFormat:
    """How the load generator writes events: a payload format and, for avro / protobuf, its schema
    (derived from the manifest) and the schema id (None: bare values, for ``payload.schema``)."""

    manifest: Manifest
    payload: PayloadFormat = PayloadFormat.JSON
    schema_id: int | None = None

    @functools.cached_property
    def schema(self) -> str:
        """The derived schema's text: Avro JSON or .proto source ("" for json and tensor)."""
        if self.payload == PayloadFormat.AVRO:
            from streamhydro.payload.formats import avro

            return json.dumps(avro.schema_for(self.manifest))
        if self.payload == PayloadFormat.PROTOBUF:
            from streamhydro.payload.formats import protobuf

            return protobuf.proto_for(self.manifest)
        return ""

    def values(self, count: int, rng: np.random.Generator) -> list[bytes]:
        columns = _columns(self.manifest, count, rng)
        if self.payload == PayloadFormat.TENSOR:
            from streamhydro.payload.formats import tensor

            if len(self.manifest.inputs) != 1:
                raise ConfigError("--payload", f"tensor payloads need a single-input model, {self.manifest.name} has {len(self.manifest.inputs)}", "use --payload json")
            return tensor.encode(np.column_stack([columns[f.path] for f in input_fields(self.manifest)]).reshape(count, -1))
        if self.payload == PayloadFormat.JSON:
            return _json_values(self.manifest, columns, count)
        events = _events(self.manifest, columns, count)
        if self.payload == PayloadFormat.AVRO:
            from streamhydro.payload.formats import avro

            return avro.encode(events, json.loads(self.schema), self.schema_id)
        from streamhydro.payload.formats import protobuf

        return protobuf.encode(events, protobuf.message_class(self.schema), self.schema_id)

    @property
    def bad_kinds(self) -> tuple[str, ...]:
        kinds = BAD_KINDS[self.payload]
        return kinds + WIRE_BAD_KINDS if self.schema_id is not None else kinds


def make_values(
    manifest: Manifest, payload: PayloadFormat, count: int, rng: np.random.Generator | None = None, schema_id: int | None = None
) -> list[bytes]:
    """``count`` well-formed event values for ``manifest``'s inputs in the given payload format
    (avro / protobuf: bare, or in the wire format with ``schema_id``)."""
    return EventFormat(manifest, payload, schema_id).values(count, rng or np.random.default_rng(0))


def _columns(manifest: Manifest, count: int, rng: np.random.Generator) -> dict[str, Any]:
    """One column per mapped field: numbers drawn around the training data's statistics, booleans
    at random, strings from the field's categories; vectors as (count, width) matrices."""
    mean, std = feature_stats(manifest)
    matrix = rng.normal(mean, std, size=(count, mean.size)).astype(np.float32)
    columns: dict[str, Any] = {}
    at = 0
    for field in input_fields(manifest):
        width = field.spec.width if field.vector else 1
        block = matrix[:, at : at + width]
        at += width
        if field.kind == NUMBER:
            values = np.rint(block).astype(np.int64) if field.spec.dtype in INTS else block
        elif field.kind == BOOLEAN:
            values = rng.random((count, width)) < 0.5
        else:
            vocabulary = np.array(categories(manifest, field.path), dtype=object)
            values = vocabulary[rng.integers(0, len(vocabulary), size=(count, width))]
        columns[field.path] = values if field.vector else values[:, 0]
    return columns


def _tree(manifest: Manifest) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for field in input_fields(manifest):
        node = tree
        for part in field.parts[:-1]:
            node = node.setdefault(part, {})
        node[field.parts[-1]] = field
    return tree


def _events(manifest: Manifest, columns: dict[str, Any], count: int) -> list[dict[str, Any]]:
    """Event records: nested dicts with plain Python values."""
    lists = {path: column.tolist() for path, column in columns.items()}

    def build(node: dict[str, Any], i: int) -> dict[str, Any]:
        return {key: build(value, i) if isinstance(value, dict) else lists[value.path][i] for key, value in node.items()}

    tree = _tree(manifest)
    return [build(tree, i) for i in range(count)]


def _json_values(manifest: Manifest, columns: dict[str, Any], count: int) -> list[bytes]:
    """JSON values from one %-template per model (nested objects, arrays), much faster than
    serializing a dict per event."""
    slots: list[list[Any]] = []

    def literal(field: Any, column: Any) -> tuple[str, list[list[Any]]]:
        if field.kind == NUMBER:
            return ("%d" if column.dtype.kind == "i" else "%.6g"), [column.tolist()]
        if field.kind == BOOLEAN:
            return "%s", [["true" if v else "false" for v in column.tolist()]]
        return "%s", [[json.dumps(v) for v in column.tolist()]]

    def render(node: dict[str, Any]) -> str:
        items = []
        for key, value in node.items():
            name = json.dumps(key).replace("%", "%%")
            if isinstance(value, dict):
                items.append(f"{name}:{render(value)}")
                continue
            column = columns[value.path]
            if value.vector:
                formats = []
                for j in range(column.shape[1]):
                    placeholder, data = literal(value, column[:, j])
                    formats.append(placeholder)
                    slots.extend(data)
                items.append(f"{name}:[{','.join(formats)}]")
            else:
                placeholder, data = literal(value, column)
                items.append(f"{name}:{placeholder}")
                slots.extend(data)
        return "{" + ",".join(items) + "}"

    template = render(_tree(manifest))
    return [(template % row).encode() for row in zip(*slots)] if slots else [template.encode()] * count


def corrupt(value: bytes, kind: str, manifest: Manifest) -> bytes:
    """A malformed version of a good ``value``: one of the kinds in ``BAD_KINDS`` / ``WIRE_BAD_KINDS``."""
    if kind == "empty_value":
        return b""
    if kind == "truncated_json":
        return value[: len(value) // 2]
    if kind == "not_json":
        return b"\xff\xfenot json"
    if kind == "wrong_tensor_length":
        return value[:-4]
    if kind == "truncated_record":
        return value[:-1]
    if kind == "trailing_bytes":
        return value + b"\x00"
    if kind == "corrupt_message":
        return value + b"\xff"
    if kind == "not_wire_format":
        return b"\x01" + value[1:]
    if kind == "unknown_schema":
        return value[:1] + UNKNOWN_SCHEMA_ID.to_bytes(4, "big") + value[5:]
    first = input_fields(manifest)[0]
    document = json.loads(value)
    parent = document
    for part in first.parts[:-1]:
        parent = parent[part]
    if kind == "wrong_type":
        parent[first.parts[-1]] = True if first.kind == TEXT else "not a number"
    elif kind == "missing_feature":
        del parent[first.parts[-1]]
    else:
        raise ValueError(f"unknown bad-record kind {kind!r}")
    return json.dumps(document).encode()


@dataclasses.dataclass
class LoadGenerator:
    """Sends events with confluent-kafka; keys are ``k-<n>``, a header names the generator."""

    client: ClientConfig
    topic: str
    manifest: Manifest
    payload: PayloadFormat = PayloadFormat.JSON
    bad_fraction: float = 0.0
    seed: int = 0
    schema_registry_url: str = ""
    schema_registry_client: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        from confluent_kafka import Producer

        from streamhydro.kafka.clients import build_client

        self.format = EventFormat(self.manifest, self.payload)
        if self.schema_registry_url:
            from streamhydro.payload import schemas

            schema_type = "AVRO" if self.payload == PayloadFormat.AVRO else "PROTOBUF"
            schema_id = schemas.register(
                self.schema_registry_url, self.schema_registry_client, f"{self.topic}-value",
                schemas.RegisteredSchema(schema_type, self.format.schema),
            )
            self.format = EventFormat(self.manifest, self.payload, schema_id)
        self._producer = build_client(Producer, self.client.with_defaults(LOAD_GENERATOR_PRODUCER_DEFAULTS))
        self._rng = np.random.default_rng(self.seed)
        self._bad_kinds = self.format.bad_kinds
        self.sent = 0
        self.bad: Counter[str] = Counter()
        self._failed: list[str] = []
        self._started = time.monotonic()
        self._finished: float | None = None

    def run(self, count: int | None, rate: float | None, stop: threading.Event) -> dict[str, Any]:
        """Send ``count`` events (None: until ``stop``), at most ``rate`` per second (None: unthrottled)."""
        self._started = time.monotonic()
        # With a rate, sends go out every ~10 ms, a steady stream as live producers make, not bursts.
        chunk = max(1, min(CHUNK, int(rate / 100))) if rate else CHUNK
        while not stop.is_set() and (count is None or self.sent < count):
            n = chunk if count is None else min(chunk, count - self.sent)
            if rate:
                due = self._started + (self.sent + n) / rate
                if stop.wait(max(0.0, due - time.monotonic())):
                    break
            self._send_chunk(n)
        unacknowledged = self._producer.flush(FLUSH_TIMEOUT_S)
        self._finished = time.monotonic()
        if unacknowledged:
            raise DeliveryError(unacknowledged, self.sent, f"no acknowledgement within {FLUSH_TIMEOUT_S} s of the last send")
        if self._failed:
            raise DeliveryError(len(self._failed), self.sent, self._failed[0])
        return self.summary()

    def close(self) -> None:
        """Release the producer (its connections and threads); call after :meth:`run`."""
        self._producer.close()

    def summary(self) -> dict[str, Any]:
        seconds = (self._finished or time.monotonic()) - self._started
        return {
            "topic": self.topic,
            "sent": self.sent,
            "bad": dict(self.bad),
            "payload": self.payload,
            "seconds": round(seconds, 3),
            "events_per_s": round(self.sent / seconds, 1) if seconds > 0 else 0.0,
        }

    def _send_chunk(self, n: int) -> None:
        values = self.format.values(n, self._rng)
        bad = np.flatnonzero(self._rng.random(n) < self.bad_fraction) if self.bad_fraction else ()
        for i in bad:
            kind = self._bad_kinds[sum(self.bad.values()) % len(self._bad_kinds)]
            values[i] = corrupt(values[i], kind, self.manifest)
            self.bad[kind] += 1
        headers = [("producer", b"streamhydro")]
        produce = self._producer.produce
        for i, value in enumerate(values):
            key = f"k-{self.sent + i}".encode()
            while True:
                try:
                    produce(self.topic, value=value, key=key, headers=headers, on_delivery=self._delivered)
                    break
                except BufferError:
                    self._producer.poll(0.05)
        self.sent += n
        self._producer.poll(0)

    def _delivered(self, err: Any, msg: Any) -> None:
        if err is not None:
            self._failed.append(str(err))
