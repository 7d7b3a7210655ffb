"""Payload formats: record values -> model inputs, one module per :class:`PayloadFormat`.

Runs in executor Python workers (a decoder per scoring task, cheap to build) and on the driver
(:func:`make_decoder` is the check that a model version can be fed by the configured payload).

Every format decodes a batch of values into a table of event fields and hands it to
:class:`streamhydro.payload.fields.Fields`, so inputs are typed and bad fields classified the same
way whatever the format. Each module also *encodes* events (the load generator and the tests use it).

* :mod:`.json` -- one JSON object per record, nested objects for dotted paths.
* :mod:`.avro` -- Avro binary (fastavro), Confluent wire format or bare with a fixed ``.avsc``.
* :mod:`.protobuf` -- Protobuf, Confluent wire format (with message indexes) or bare with a fixed ``.proto``.
* :mod:`.tensor` -- the raw little-endian float32 row of a single-input model.
"""

from __future__ import annotations

import dataclasses
import importlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from streamhydro.config import PayloadSettings
from streamhydro.payload import EMPTY_VALUE, VALUE_TOO_LARGE, PayloadFormat, Rejected, Rejections, isolate
from streamhydro.payload.fields import Fields
from streamhydro.registry import Manifest

# The module of each format; each defines ``Decoder`` (a subclass of :class:`Decoder`).
MODULES = {
    PayloadFormat.JSON: "streamhydro.payload.formats.json",
    PayloadFormat.AVRO: "streamhydro.payload.formats.avro",
    PayloadFormat.PROTOBUF: "streamhydro.payload.formats.protobuf",
    PayloadFormat.TENSOR: "streamhydro.payload.formats.tensor",
}


@dataclasses.dataclass(frozen=True)
class Decoded:
    """The result of decoding one batch of record values.

    ``inputs`` maps each model input name to an array of the good rows, shaped like the input
    (batch axis first) and typed like it. ``good`` are the ascending row positions of those rows in
    the decoded batch; ``rejected`` names every other row and why.
    """

    inputs: dict[str, np.ndarray]
    good: np.ndarray
    rejected: Rejected


class Decoder:
    """Decodes record values for one model's inputs. Built per task; raises :class:`ModelError` at
    construction when the settings cannot feed the manifest."""

    def __init__(self, manifest: Manifest, settings: PayloadSettings) -> None:
        self.manifest = manifest
        self.settings = settings
        self.fields = Fields(manifest)

    def decode(self, values: pa.Array) -> Decoded:
        """Decode a binary array of record values (nulls allowed). No record's bytes make it raise."""
        rejections = Rejections()
        parts = isolate(lambda lo, hi: self._decode(values.slice(lo, hi - lo)), len(values), rejections)
        if len(parts) == 1 and not rejections:
            return parts[0][1]
        for lo, part in parts:
            rejections.add_all(part.rejected, part.rejected.rows + lo)
        empty = self.fields.no_rows()
        inputs = {
            name: np.concatenate([empty[name]] + [part.inputs[name] for _, part in parts]) for name in empty
        }
        good = np.concatenate([np.zeros(0, np.int64)] + [part.good + lo for lo, part in parts])
        return Decoded(inputs, good, rejections.result())

    def _decode(self, values: pa.Array) -> Decoded:
        raise NotImplementedError

    def screen(self, values: pa.Array, errors: Rejections) -> tuple[np.ndarray, np.ndarray]:
        """Value lengths, and which values are worth decoding: empty and oversized ones are rejected here."""
        lengths = pc.fill_null(pc.binary_length(values), 0).to_numpy(zero_copy_only=False)
        limit = self.settings.max_value_bytes
        too_large = lengths > limit
        for position in np.flatnonzero(too_large):
            errors.add(
                position,
                VALUE_TOO_LARGE,
                f"record value has {int(lengths[position])} bytes, over payload.max_value_bytes = {limit}: "
                "not decoded and not copied here; read it at its origin, or raise payload.max_value_bytes",
            )
        for position in np.flatnonzero(lengths == 0):
            errors.add(position, EMPTY_VALUE, "record value is null or empty")
        return lengths, ~too_large & (lengths > 0)

    def finish(self, errors: Rejections, inputs: dict[str, np.ndarray], good: np.ndarray) -> Decoded:
        return Decoded(inputs=inputs, good=np.asarray(good, dtype=np.int64), rejected=errors.result())


def make_decoder(manifest: Manifest, settings: PayloadSettings) -> Decoder:
    """The decoder of ``settings.format`` for ``manifest``; :class:`ModelError` when it cannot feed the
    model (an unmapped input, a field missing from a known schema, an incompatible type)."""
    return importlib.import_module(MODULES[settings.format]).Decoder(manifest, settings)


def offsets(array: pa.Array) -> np.ndarray:
    """The value offsets of a binary or large_binary array, as int64."""
    width = np.int64 if pa.types.is_large_binary(array.type) else np.int32
    raw = np.frombuffer(array.buffers()[1], dtype=width)
    return raw[array.offset : array.offset + len(array) + 1].astype(np.int64)
