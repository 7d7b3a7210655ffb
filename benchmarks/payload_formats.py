"""Decode throughput of each payload format on the same events, in this process (no Spark, no broker)::

    python benchmarks/payload_formats.py [--events 100000] [--batch-size 4096] [--model breast_cancer]

The load generator's events for the model (``streamhydro.producer.EventFormat``) are written in every
format: json, tensor (single float inputs only), avro and protobuf, the last two bare with the schema
the load generator derives (the fixed-schema mode) and in the Confluent wire format (``avro_wire``,
``protobuf_wire``: the schema put in the worker's cache as a fetch would, so no registry is involved).
Each format's decoder (``make_decoder``, as a scoring task builds it) decodes them in batches of
``--batch-size`` three times; the best run counts. Prints one line per format, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from streamhydro.config import PayloadSettings
from streamhydro.payload import schemas
from streamhydro.payload.formats import make_decoder
from streamhydro.producer import EventFormat
from streamhydro.registry import Registry

URL = "http://registry.invalid"  # never contacted: the schema is in the cache
SCHEMA_ID = 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--registry", default="models")
    parser.add_argument("--model", default="breast_cancer")
    args = parser.parse_args()
    manifest = Registry(args.registry).get(args.model, "promoted").manifest
    formats = ["json", "avro", "avro_wire", "protobuf", "protobuf_wire"]
    if len(manifest.inputs) == 1 and manifest.inputs[0].dtype.startswith("float"):
        formats.insert(1, "tensor")
    results = {}
    with tempfile.TemporaryDirectory() as work:
        for name in formats:
            payload, _, wire = name.partition("_")
            source = EventFormat(manifest, payload, SCHEMA_ID if wire else None)
            settings = PayloadSettings(format=payload)
            if wire:
                schemas.remember(URL, SCHEMA_ID, schemas.RegisteredSchema(payload.upper(), source.schema))
                settings = PayloadSettings(format=payload, schema_registry_url=URL)
            elif source.schema:
                path = Path(work, f"events.{'avsc' if payload == 'avro' else 'proto'}")
                path.write_text(source.schema)
                settings = PayloadSettings(format=payload, schema=str(path))
            values = source.values(args.events, np.random.default_rng(0))
            batches = [pa.array(values[i : i + args.batch_size], pa.binary()) for i in range(0, len(values), args.batch_size)]
            decoder = make_decoder(manifest, settings)
            best = 0.0
            for _ in range(3):
                started = time.perf_counter()
                rows = sum(len(decoder.decode(batch).good) for batch in batches)
                best = max(best, rows / (time.perf_counter() - started))
            if rows != args.events:
                raise SystemExit(f"{name}: decoded {rows} of {args.events} generated events")
            results[name] = round(best)
            print(f"{name:>13}: {best:>12,.0f} rows/s")
    print(json.dumps({"model": args.model, "events": args.events, "batch_size": args.batch_size, "rows_per_s": results}))


if __name__ == "__main__":
    main()
