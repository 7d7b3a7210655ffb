"""Schemas by id from a Confluent-compatible schema registry, cached per Python worker, and the
Confluent wire format's header.

Runs in executor Python workers (decoding avro / protobuf values in the wire format) and in clients
(the load generator registers the schemas it derives).

Wire format: byte 0 (the magic byte), a 4-byte big-endian schema id, then (protobuf only) the
message indexes, then the encoded record.

Caveats of the cache (like the Kafka clients' in :mod:`streamhydro.kafka.clients`):

- One registry client per (URL, client settings) and one entry per (URL, schema id) per process,
  kept until the worker exits; a schema under an id never changes, so entries are never refreshed.
  An id the registry answers 404 for is cached as unknown too (a retried task would meet it again).
- PySpark forks workers from a daemon: the cache belongs to the process that filled it and is
  dropped when the pid changes (an HTTP client's connections do not survive a fork).
- The lock is held while a schema is fetched, so concurrent tasks of one worker fetch an id once.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from streamhydro.errors import SchemaRegistryError
from streamhydro.secrets import redact

MAGIC = b"\x00"
HEADER_BYTES = 5  # magic byte + 4-byte schema id
# Seconds one registry request may take: the client's own default waits forever on a registry that
# accepts the connection and never answers. With its retries (3, 1 s apart) a fetch fails within ~45 s.
DEFAULT_TIMEOUT_S = 10
# Client settings the registry client takes as numbers; the config holds every value as a string.
_NUMERIC_SETTINGS = ("timeout", "max.retries", "retries.wait.ms", "retries.max.wait.ms", "cache.capacity", "cache.latest.ttl.sec")


@dataclasses.dataclass(frozen=True)
class RegisteredSchema:
    """A schema as the registry holds it: its type (AVRO, PROTOBUF, JSON) and text, and the schemas it
    imports by name (protobuf ``import "name"``), each as ``(name, text)``."""

    schema_type: str
    text: str
    references: tuple[tuple[str, str], ...] = ()


# A registered schema never changes, so a found one is kept for the worker's life. An id the registry does
# not know may be registered a moment later (ids are handed out as producers register), so a miss is only
# remembered this long: a burst of records with an unknown id costs one request per this many seconds.
MISS_RETRY_S = 5.0

_lock = threading.Lock()
_owner_pid = os.getpid()
_clients: dict[tuple[str, tuple[tuple[str, str], ...]], Any] = {}
_schemas: dict[tuple[str, int], RegisteredSchema] = {}
_misses: dict[tuple[str, int], float] = {}  # (url, id) -> monotonic time until which the id counts as unknown
_now = time.monotonic


def _reset_after_fork() -> None:
    global _owner_pid
    if os.getpid() != _owner_pid:
        _clients.clear()
        _schemas.clear()
        _misses.clear()
        _owner_pid = os.getpid()


def client(url: str, settings: Mapping[str, str]) -> Any:
    """This process's ``confluent_kafka.schema_registry.SchemaRegistryClient`` for (url, settings)."""
    from confluent_kafka.schema_registry import SchemaRegistryClient

    key = (url, tuple(sorted(settings.items())))
    with _lock:
        _reset_after_fork()
        if key not in _clients:
            try:
                conf = {"timeout": DEFAULT_TIMEOUT_S, **{k: _number(k, v) if k in _NUMERIC_SETTINGS else v for k, v in settings.items()}}
                _clients[key] = SchemaRegistryClient({**conf, "url": url})
            except (ValueError, TypeError) as exc:
                raise SchemaRegistryError(url, f"the client refused its settings: {redact(str(exc))}") from exc
        return _clients[key]


def _number(key: str, value: str) -> float | int:
    number = float(value)
    return int(number) if number.is_integer() else number


def schema(url: str, settings: Mapping[str, str], schema_id: int) -> RegisteredSchema | None:
    """The schema registered under ``schema_id`` (None when the registry does not know the id);
    :class:`SchemaRegistryError` when it cannot answer. See :data:`MISS_RETRY_S` for what is cached."""
    key = (url, schema_id)
    with _lock:
        _reset_after_fork()
        if key in _schemas:
            return _schemas[key]
        if _misses.get(key, float("-inf")) > _now():
            return None
    fetched = _fetch(client(url, settings), url, schema_id)
    remember(url, schema_id, fetched)
    return fetched


def remember(url: str, schema_id: int, registered: RegisteredSchema | None) -> None:
    """Put a fetch's answer in this process's cache (``None``: the registry does not know the id)."""
    with _lock:
        _reset_after_fork()
        if registered is None:
            _misses[(url, schema_id)] = _now() + MISS_RETRY_S
        else:
            _schemas[(url, schema_id)] = registered
            _misses.pop((url, schema_id), None)


def forget_all() -> None:
    """Drop this process's cached clients and schemas (tests)."""
    with _lock:
        _clients.clear()
        _schemas.clear()
        _misses.clear()


def _fetch(registry: Any, url: str, schema_id: int) -> RegisteredSchema | None:
    from confluent_kafka.schema_registry.error import SchemaRegistryError as ClientError

    try:
        found = registry.get_schema(schema_id)
        references = tuple(
            (ref.name, registry.get_version(ref.subject, ref.version).schema.schema_str) for ref in found.references or ()
        )
    except ClientError as exc:
        if exc.http_status_code == 404:
            return None
        raise SchemaRegistryError(url, f"schema id {schema_id}: HTTP {exc.http_status_code}: {redact(str(exc))}") from exc
    except Exception as exc:  # noqa: BLE001 -- the HTTP client's connection errors have no common base we can name
        raise SchemaRegistryError(url, f"schema id {schema_id}: {type(exc).__name__}: {redact(str(exc))}") from exc
    return RegisteredSchema(found.schema_type or "AVRO", found.schema_str, references)


def register(url: str, settings: Mapping[str, str], subject: str, registered: RegisteredSchema) -> int:
    """Register a schema under ``subject`` (a client-side step: the load generator); returns its id."""
    from confluent_kafka.schema_registry import Schema

    try:
        schema_id = client(url, settings).register_schema(subject, Schema(registered.text, registered.schema_type))
    except Exception as exc:  # noqa: BLE001 -- as in _fetch
        raise SchemaRegistryError(url, f"registering subject {subject!r}: {type(exc).__name__}: {redact(str(exc))}") from exc
    remember(url, schema_id, registered)
    return schema_id


def wire_header(schema_id: int) -> bytes:
    return MAGIC + int(schema_id).to_bytes(4, "big")


def split_header(values: pa.Array, positions: np.ndarray, minimum: int) -> tuple[np.ndarray, np.ndarray]:
    """For the values at ``positions``: whether each has the magic byte and at least ``minimum``
    bytes, and the schema id of each that does (0 for the others)."""
    if len(positions) == 0:
        return np.zeros(0, bool), np.zeros(0, np.int64)
    chosen = values.take(pa.array(positions))
    lengths = pc.fill_null(pc.binary_length(chosen), 0).to_numpy(zero_copy_only=False)
    magic = pc.fill_null(pc.equal(pc.binary_slice(chosen, 0, 1), pa.scalar(MAGIC)), False).to_numpy(zero_copy_only=False)
    framed = magic & (lengths >= minimum)
    ids = np.zeros(len(positions), np.int64)
    if framed.any():
        heads = pc.binary_slice(chosen.filter(pa.array(framed)), 1, HEADER_BYTES)
        raw = b"".join(heads.to_pylist())
        ids[framed] = np.frombuffer(raw, dtype=">u4").astype(np.int64)
    return framed, ids
