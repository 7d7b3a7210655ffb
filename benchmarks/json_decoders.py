"""JSON decoders for the demo model's events, on the same events in one run: which is fastest?

    pip install -e '.[cpu,bench]'     # orjson, pysimdjson
    python benchmarks/json_decoders.py [--events 100000] [--rounds 5]

Every candidate turns batches of 4,096 record values (the demo model's events from the load generator:
one flat object of 30 numbers each) into the float32 matrix ONNX Runtime takes, on the happy path (every
record well formed), one thread:

- ``streamhydro``: serve's decoder (``make_decoder``: msgspec's typed pass over the plain records, the
  general pass for the rest, with screening and type checks);
- ``streamhydro_general``: its general pass alone (pyarrow's JSON reader over the joined batch, bisection
  around bad records, classification in Python): serve's decoder before the msgspec pass;
- ``pyarrow``: ``pyarrow.json.read_json`` of the joined batch with the explicit schema, nothing else (the
  core of the general pass);
- ``orjson``: ``orjson.loads`` per record, then the 30 values per row into numpy;
- ``msgspec``: ``msgspec.json.Decoder`` of a typed ``Struct`` (30 float fields) per record, then numpy;
- ``msgspec_array``: the same decoder over the whole batch joined as one JSON array;
- ``simdjson``: ``simdjson.Parser`` per record, the 30 values per row into numpy.

Only the two ``streamhydro`` candidates send a bad record to the dead-letter topic with its error class;
the others would need that added, so their rates are upper bounds. The two ``streamhydro`` candidates also
run on the same batches with every 100th record malformed (``*_1pct_bad``: the load generator's JSON
faults in turn), where serve's decoder hands those records to the general pass. Candidates take turns
for ``--rounds`` rounds; the JSON line (last) has each one's median rows/s and its ratio to
``streamhydro``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from functools import partial
from pathlib import Path

import msgspec
import numpy as np
import orjson
import pyarrow as pa
import pyarrow.json as pa_json
import simdjson

from streamhydro.config import PayloadSettings
from streamhydro.payload.formats import make_decoder
from streamhydro.producer import JSON_BAD_KINDS, corrupt, make_values
from streamhydro.registry import Registry
from turns import take_turns

REPO = Path(__file__).resolve().parent.parent
BATCH = 4096


def candidates(manifest) -> dict[str, Callable[[list[bytes]], np.ndarray]]:
    names = list(manifest.inputs[0].features)
    decoder = make_decoder(manifest, PayloadSettings())
    schema = pa.schema([(name, pa.float64()) for name in names])
    parse_options = pa_json.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
    Event = msgspec.defstruct("Event", [(name, float) for name in names])
    one = msgspec.json.Decoder(Event)
    many = msgspec.json.Decoder(list[Event])
    parser = simdjson.Parser()

    def streamhydro_decoder(values: list[bytes]) -> np.ndarray:
        return decoder.decode(pa.array(values, pa.binary())).inputs[manifest.inputs[0].name]

    def streamhydro_general(values: list[bytes]) -> np.ndarray:
        return decoder._decode_general(pa.array(values, pa.binary())).inputs[manifest.inputs[0].name]

    def pyarrow_reader(values: list[bytes]) -> np.ndarray:
        table = pa_json.read_json(pa.BufferReader(b"\n".join(values)), read_options=pa_json.ReadOptions(use_threads=False, block_size=1 << 24), parse_options=parse_options)
        return np.column_stack([table.column(i).to_numpy() for i in range(len(names))]).astype(np.float32)

    def orjson_rows(values: list[bytes]) -> np.ndarray:
        return np.array([[document[name] for name in names] for document in map(orjson.loads, values)], dtype=np.float32)

    def msgspec_rows(values: list[bytes]) -> np.ndarray:
        return np.array([msgspec.structs.astuple(one.decode(value)) for value in values], dtype=np.float32)

    def msgspec_array(values: list[bytes]) -> np.ndarray:
        return np.array([msgspec.structs.astuple(event) for event in many.decode(b"[" + b",".join(values) + b"]")], dtype=np.float32)

    def simdjson_rows(values: list[bytes]) -> np.ndarray:
        rows = []
        for value in values:
            document = parser.parse(value)
            rows.append([document[name] for name in names])
            del document  # the parser is reused only once no object refers to its last document
        return np.array(rows, dtype=np.float32)

    return {
        "streamhydro": streamhydro_decoder, "streamhydro_general": streamhydro_general, "pyarrow": pyarrow_reader, "orjson": orjson_rows,
        "msgspec": msgspec_rows, "msgspec_array": msgspec_array, "simdjson": simdjson_rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    manifest = Registry(REPO / "models").get("breast_cancer", "latest").manifest
    values = make_values(manifest, "json", count=args.events)
    dirty = [corrupt(value, JSON_BAD_KINDS[(i // 100) % len(JSON_BAD_KINDS)], manifest) if i % 100 == 99 else value for i, value in enumerate(values)]
    batches = [values[i:i + BATCH] for i in range(0, len(values), BATCH)]
    dirty_batches = [dirty[i:i + BATCH] for i in range(0, len(dirty), BATCH)]
    contenders = {name: (decode, batches) for name, decode in candidates(manifest).items()}
    for name in ("streamhydro", "streamhydro_general"):
        contenders[f"{name}_1pct_bad"] = (contenders[name][0], dirty_batches)
    for runs in (batches, dirty_batches):  # every candidate decodes the same matrix from the same batches
        reference = np.concatenate([contenders["streamhydro_general"][0](batch) for batch in runs])
        for name, (decode, its_batches) in contenders.items():
            if its_batches is runs:
                got = np.concatenate([decode(batch) for batch in runs])
                if got.shape != reference.shape or not np.array_equal(got, reference):
                    raise SystemExit(f"{name} decoded other values than streamhydro's general pass")
    runs = {name: partial(_each, decode, its_batches) for name, (decode, its_batches) in contenders.items()}
    print(json.dumps({
        "events": len(values), "batch": BATCH, "rounds": args.rounds,
        **take_turns(runs, len(values), args.rounds, baseline="streamhydro"),
        "versions": {"pyarrow": pa.__version__, "orjson": orjson.__version__, "msgspec": msgspec.__version__},
    }))


def _each(decode: Callable[[list[bytes]], np.ndarray], batches: list[list[bytes]]) -> None:
    for batch in batches:
        decode(batch)

if __name__ == "__main__":
    main()
