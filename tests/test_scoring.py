"""score_batches inside real Spark (local[2]): mapInArrow output equals ONNX Runtime run directly."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

from _inference_models import LABELS, Holder, feature_spec, json_values, kafka_batch, softmax_model
from streamhydro import payload as p
from streamhydro.config import PayloadSettings
from streamhydro.executor.scoring import OUTPUT_SCHEMA, EngineSettings, ScoringPlan, score_batches

pytestmark = pytest.mark.spark


def test_map_in_arrow_scores_good_rows_and_dead_letters_bad_ones(spark):
    data, manifest = softmax_model([feature_spec("x", 4)])
    rows = np.random.default_rng(5).normal(size=(3000, 4)).astype(np.float32)
    values = json_values(manifest, rows)
    bad_at = {17: b'{"x_f0":1', 500: b"", 2999: b'{"x_f0":"a","x_f1":1,"x_f2":1,"x_f3":1}'}
    for position, value in bad_at.items():
        values[position] = value
    batch = kafka_batch(values)
    frame = spark.createDataFrame(batch.to_pandas()).repartition(3)
    plan = ScoringPlan(
        manifest=manifest,
        model_bytes=spark.sparkContext.broadcast(data),
        payload=PayloadSettings(),
        output_topic="preds",
        dead_letter_topic="dead",
        engine=EngineSettings(batch_size=256, pipeline_depth=2),
    )
    out = frame.mapInArrow(score_batches(plan), OUTPUT_SCHEMA).toArrow()
    assert out.schema.names == ["key", "value", "topic", "headers"]
    topics = out.column("topic").to_pylist()
    assert topics.count("preds") == 3000 - len(bad_at) and topics.count("dead") == len(bad_at)

    expected = ort.InferenceSession(data).run(None, {"x": rows})[0]
    seen = set()
    for key, value, topic, headers in zip(*(out.column(c).to_pylist() for c in out.schema.names)):
        if topic == "dead":
            origin = {h["key"]: h["value"] for h in headers}
            offset = int(origin[p.HEADER_ORIGIN_OFFSET])
            assert value == bad_at[offset]
            assert origin[p.HEADER_ERROR_CLASS].decode() in p.ERROR_CLASSES
            continue
        doc = json.loads(value)
        offset = doc["source"]["offset"]
        seen.add(offset)
        assert key == f"k{offset}".encode() and doc["key"] == f"k{offset}"
        assert headers == [{"key": "trace", "value": f"t{offset}".encode()}]
        assert doc["idempotency_key"] == f"in/0/{offset}"
        scores = [doc["prediction"]["scores"][label] for label in LABELS]
        np.testing.assert_allclose(scores, expected[offset], rtol=1e-5, atol=1e-7)
    assert seen == set(range(3000)) - set(bad_at)


def test_holder_without_broadcast_works_in_a_task(spark):
    data, manifest = softmax_model([feature_spec("x", 4)], seed=9)
    rows = np.ones((10, 4), np.float32)
    frame = spark.createDataFrame(kafka_batch(json_values(manifest, rows)).to_pandas())
    plan = ScoringPlan(manifest, Holder(data), PayloadSettings(), "preds", "dead", EngineSettings(pipeline_depth=0))
    out = frame.mapInArrow(score_batches(plan), OUTPUT_SCHEMA).collect()
    assert len(out) == 10 and {row.topic for row in out} == {"preds"}
