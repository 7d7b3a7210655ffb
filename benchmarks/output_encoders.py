"""Prediction encoders for the demo model's outputs, on the same rows in one run: which is fastest?

    pip install -e '.[cpu,bench]'     # orjson
    python benchmarks/output_encoders.py [--rows 100000] [--rounds 5]

Every candidate turns batches of 4,096 scored rows (Kafka source columns as serve's tasks hold them, and
the demo classifier's float32 scores) into the prediction record values serve writes (key, prediction
label and scores, model, source, idempotency key), one thread:

- ``streamhydro``: serve's encoder (``Encoder.predictions``: Arrow string kernels over whole columns, one
  element-wise join per batch; keys that are not UTF-8 get ``key_base64``, a non-finite score ``null``);
- ``orjson``: a dict per row, ``orjson.dumps`` with numpy float32 scores (written as float32);
- ``msgspec``: a dict per row, ``msgspec.json.encode`` (scores as Python floats: float32 values written
  with a double's digits).

Only ``streamhydro`` handles keys that are not UTF-8 and non-finite scores; the others would need that
added, so their rates are upper bounds. Each candidate's values must parse to the same JSON as
serve's (scores compared as float32). Candidates take turns for ``--rounds`` rounds; the JSON line (last)
has each one's median rows/s and its ratio to ``streamhydro``.
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

from streamhydro.kafka.records import ARROW_SCHEMA, ConsumedColumns, to_record_batch
from streamhydro.payload.encoding import Encoder
from streamhydro.registry import Registry
from turns import take_turns

REPO = Path(__file__).resolve().parent.parent
BATCH = 4096

Candidate = Callable[[pa.RecordBatch, np.ndarray], list[bytes]]


def candidates(encoder: Encoder) -> dict[str, Candidate]:
    manifest = encoder.manifest
    labels = list(manifest.labels)
    output = manifest.outputs[0].name
    model = {"name": manifest.name, "version": manifest.version}

    def streamhydro(meta: pa.RecordBatch, scores: np.ndarray) -> list[bytes]:
        return encoder.predictions(meta, {output: scores})[0].column("value").to_pylist()

    def rows(meta: pa.RecordBatch, scores: np.ndarray, as_float: bool) -> list[dict]:
        keys = [key.decode() for key in meta.column("key").to_pylist()]
        topic = meta.column("topic")[0].as_py()
        partitions = meta.column("partition").to_pylist()
        offsets = meta.column("offset").to_pylist()
        stamps = (meta.column("timestamp").cast(pa.int64()).to_numpy() // 1000).tolist()
        best = scores.argmax(axis=1).tolist()
        values = scores.tolist() if as_float else list(scores)
        return [
            {
                "key": key,
                "prediction": {"label": labels[top], "scores": dict(zip(labels, row))},
                "model": model,
                "source": {"topic": topic, "partition": partition, "offset": offset, "timestamp_ms": stamp},
                "idempotency_key": f"{topic}/{partition}/{offset}",
            }
            for key, top, row, partition, offset, stamp in zip(keys, best, values, partitions, offsets, stamps)
        ]

    def orjson_rows(meta: pa.RecordBatch, scores: np.ndarray) -> list[bytes]:
        dumps, option = orjson.dumps, orjson.OPT_SERIALIZE_NUMPY
        return [dumps(row, option=option) for row in rows(meta, scores, as_float=False)]

    def msgspec_rows(meta: pa.RecordBatch, scores: np.ndarray) -> list[bytes]:
        encode = msgspec.json.Encoder().encode
        return [encode(row) for row in rows(meta, scores, as_float=True)]

    return {"streamhydro": streamhydro, "orjson": orjson_rows, "msgspec": msgspec_rows}


def batches(rows: int, rng: np.random.Generator) -> list[tuple[pa.RecordBatch, np.ndarray]]:
    """Source columns and scores, ``BATCH`` rows each, like a scoring task's after ONNX Runtime."""
    made = []
    for start in range(0, rows, BATCH):
        n = min(BATCH, rows - start)
        offsets = list(range(start, start + n))
        meta = to_record_batch(ConsumedColumns(
            keys=[b"user-%d" % o for o in offsets], values=[b"{}"] * n, topic="events", partition=0, offsets=offsets,
            timestamp_types=[1] * n, timestamps_ms=[1_765_000_000_000 + o for o in offsets], headers=[None] * n,
        ))
        probabilities = rng.random((n, 1), dtype=np.float32)
        made.append((meta, np.hstack([probabilities, 1 - probabilities])))
    return made


def same_json(a: bytes, b: bytes) -> bool:
    left, right = json.loads(a), json.loads(b)
    left_scores, right_scores = left["prediction"].pop("scores"), right["prediction"].pop("scores")
    return left == right and {k: np.float32(v) for k, v in left_scores.items()} == {k: np.float32(v) for k, v in right_scores.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    manifest = Registry(REPO / "models").get("breast_cancer", "latest").manifest
    work = batches(args.rows, np.random.default_rng(7))
    assert work[0][0].schema == ARROW_SCHEMA
    contenders = candidates(Encoder(manifest, "predictions", "dead-letters"))
    reference = [value for meta, scores in work for value in contenders["streamhydro"](meta, scores)]
    for name, encode in contenders.items():
        got = [value for meta, scores in work for value in encode(meta, scores)]
        if len(got) != len(reference) or not all(map(same_json, got, reference)):
            raise SystemExit(f"{name} encoded other values than streamhydro's encoder")
    runs = {name: partial(_each, encode, work) for name, encode in contenders.items()}
    print(json.dumps({
        "rows": args.rows, "batch": BATCH, "rounds": args.rounds,
        **take_turns(runs, args.rows, args.rounds, baseline="streamhydro"),
        "versions": {"pyarrow": pa.__version__, "orjson": orjson.__version__, "msgspec": msgspec.__version__},
    }))


def _each(encode: Candidate, work: list[tuple[pa.RecordBatch, np.ndarray]]) -> None:
    for meta, scores in work:
        encode(meta, scores)

if __name__ == "__main__":
    main()
