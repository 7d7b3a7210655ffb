"""The load generator, ``streamhydro produce``: synthetic events shaped by a model's manifest.

Runs in a client process (the demo runs it in a thread of the driver). Values are generated
vectorised with numpy; a chosen fraction of records is malformed on purpose, cycling through the
kinds of bad input the service must send to the dead-letter topic.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import threading
import time
from collections import Counter
from typing import Any

import numpy as np

from streamhydro.config import load
from streamhydro.errors import ConfigError, DeliveryError
from streamhydro.kafka.options import ClientConfig
from streamhydro.registry import Manifest, Registry

log = logging.getLogger(__name__)

JSON_BAD_KINDS = ("truncated_json", "wrong_type", "missing_feature", "empty_value", "not_json")
TENSOR_BAD_KINDS = ("wrong_tensor_length", "empty_value")
CHUNK = 2000
# How long the last sends may wait for their acknowledgements (a broker may be restarting or stalled).
FLUSH_TIMEOUT_S = 120
# The load generator's producer: idempotent, batching like a busy producer; the user's settings win.
PRODUCER_DEFAULTS = {"enable.idempotence": "true", "acks": "all", "linger.ms": "5", "batch.num.messages": "10000"}


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
    parser.add_argument("--version", default="promoted", help="latest | promoted | N (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.set_defaults(run=_run)


def add_event_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that shape generated events: shared by ``produce`` and ``demo``."""
    parser.add_argument("--payload", choices=("json", "tensor"), default="json", help="event format (default %(default)s)")
    parser.add_argument("--bad-fraction", type=_fraction, default=0.0, help="fraction of malformed events, 0..1 (default 0)")
    parser.add_argument("--registry", default="models", help="model registry directory (default %(default)s)")
    parser.add_argument("--model", default="breast_cancer", help="model whose inputs shape the events (default %(default)s)")


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction: use a number from 0 to 1")
    return value


def _run(args: argparse.Namespace) -> int:
    manifest = Registry(args.registry).get(args.model, args.version).manifest
    kafka = load(args.config).kafka
    if args.bootstrap_servers:
        kafka = dataclasses.replace(kafka, bootstrap_servers=args.bootstrap_servers)
    generator = LoadGenerator(kafka.librdkafka(), args.topic, manifest, args.payload, args.bad_fraction, seed=args.seed)
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


def make_values(
    manifest: Manifest, payload: str, count: int, rng: np.random.Generator | None = None
) -> list[bytes]:
    """``count`` well-formed event values for ``manifest``'s inputs in the given payload format."""
    rng = rng or np.random.default_rng(0)
    mean, std = feature_stats(manifest)
    matrix = rng.normal(mean, std, size=(count, mean.size)).astype(np.float32)
    if payload == "tensor":
        if len(manifest.inputs) != 1:
            raise ConfigError("model.payload", f"tensor payloads need a single-input model, {manifest.name} has {len(manifest.inputs)}", "use payload = \"json\"")
        row_bytes = mean.size * 4
        data = matrix.astype("<f4").tobytes()
        return [data[i * row_bytes:(i + 1) * row_bytes] for i in range(count)]
    template = "{" + ",".join(_json_fields(manifest)) + "}"
    return [(template % tuple(row)).encode() for row in matrix.tolist()]


def _json_fields(manifest: Manifest) -> list[str]:
    fields = []
    for spec in manifest.inputs:
        if spec.features:
            fields.extend(f'"{name}":%.6g' for name in spec.features)
        else:
            fields.append(f'"{spec.name}":[' + ",".join(["%.6g"] * spec.width) + "]")
    return fields


def corrupt(value: bytes, kind: str, manifest: Manifest) -> bytes:
    """A malformed version of a good ``value``: one of JSON_BAD_KINDS or TENSOR_BAD_KINDS."""
    if kind == "empty_value":
        return b""
    if kind == "truncated_json":
        return value[: len(value) // 2]
    if kind == "not_json":
        return b"\xff\xfenot json"
    if kind == "wrong_tensor_length":
        return value[:-4]
    first = manifest.inputs[0].features[0] if manifest.inputs[0].features else manifest.inputs[0].name
    document = json.loads(value)
    if kind == "wrong_type":
        document[first] = "not a number"
    elif kind == "missing_feature":
        del document[first]
    else:
        raise ValueError(f"unknown bad-record kind {kind!r}")
    return json.dumps(document).encode()


@dataclasses.dataclass
class LoadGenerator:
    """Sends events with confluent-kafka; keys are ``k-<n>``, a header names the generator."""

    client: ClientConfig
    topic: str
    manifest: Manifest
    payload: str = "json"
    bad_fraction: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        from confluent_kafka import Producer

        from streamhydro.kafka.clients import build_client

        self._producer = build_client(Producer, self.client.with_defaults(PRODUCER_DEFAULTS))
        self._rng = np.random.default_rng(self.seed)
        self._bad_kinds = TENSOR_BAD_KINDS if self.payload == "tensor" else JSON_BAD_KINDS
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
        values = make_values(self.manifest, self.payload, n, self._rng)
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
