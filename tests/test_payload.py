"""Payload codecs with plain pyarrow: decoding good and bad records, encoding predictions and dead letters."""

from __future__ import annotations

import base64
import json
import math

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from _inference_models import LABELS, feature_spec, json_values, kafka_batch, softmax_model
from streamhydro import payload as p
from streamhydro.config import PayloadSettings
from streamhydro.payload.formats import make_decoder
from streamhydro.payload.encoding import Encoder
from streamhydro.errors import ModelError
from streamhydro.registry import TensorSpec


@pytest.fixture(scope="module")
def model():
    return softmax_model([feature_spec("x", 3)])


def decode(manifest, values, kind="json"):
    return make_decoder(manifest, PayloadSettings(format=kind)).decode(pa.array(values, pa.binary()))


def test_good_json_decodes_in_order_ignoring_extra_fields(model):
    _, manifest = model
    values = [b'{"x_f0":1,"x_f1":2.5,"x_f2":-3,"other":"zz"}', b'{"x_f2":6,"x_f1":5,"x_f0":4}']
    decoded = decode(manifest, values)
    np.testing.assert_array_equal(decoded.inputs["x"], np.array([[1, 2.5, -3], [4, 5, 6]], np.float32))
    assert decoded.inputs["x"].dtype == np.float32
    assert decoded.good.tolist() == [0, 1] and decoded.rejected.rows.size == 0


def test_newline_inside_a_value_does_not_split_it(model):
    _, manifest = model
    decoded = decode(manifest, [b'{"x_f0":1,\n"x_f1":2,\r\n"x_f2":3, "s":"a\\nb"}', b'{"x_f0":4,"x_f1":5,"x_f2":6}'])
    assert decoded.good.tolist() == [0, 1]
    np.testing.assert_array_equal(decoded.inputs["x"][0], [1, 2, 3])


BAD_JSON = [
    (b'{"x_f0":1,"x_f1":2', p.INVALID_JSON),
    (b'{"x_f0":1,"x_f1":"two","x_f2":3}', p.WRONG_TYPE),
    (b'{"x_f0":1,"x_f1":true,"x_f2":3}', p.WRONG_TYPE),
    (b'{"x_f0":1,"x_f2":3}', p.MISSING_FEATURE),
    (b'{"x_f0":1,"x_f1":null,"x_f2":3}', p.MISSING_FEATURE),
    (b"", p.EMPTY_VALUE),
    (None, p.EMPTY_VALUE),
    (b"  \n ", p.EMPTY_VALUE),
    (b"[1,2,3]", p.NOT_AN_OBJECT),
    (b"42", p.NOT_AN_OBJECT),
    (b'{"x_f0":1,"x_f1":2,"x_f2":3} {"x_f0":1,"x_f1":2,"x_f2":3}', p.MULTIPLE_OBJECTS),
    (b'{"x_f0":1,"x_f1":2,"x_f2":3}\n{"x_f0":1,"x_f1":2,"x_f2":3}', p.MULTIPLE_OBJECTS),
    (b'{"x_f0":NaN,"x_f1":2,"x_f2":3}', p.NON_FINITE),
    (b'{"x_f0":1e999,"x_f1":2,"x_f2":3}', p.NON_FINITE),
    (b"\xff\xfe{}", p.INVALID_JSON),
    (b"null", p.NOT_AN_OBJECT),
    (b" null", p.NOT_AN_OBJECT),
    (b"null {}", p.MULTIPLE_OBJECTS),
    (b"[" * 100_000 + b"]" * 100_000, p.INVALID_JSON),
    (b'{"x_f0":' + b"[" * 100_000 + b"]" * 100_000 + b"}", p.INVALID_JSON),
    (b'{"x_f0":"a","x_f1":2,"x_f2":3,"n":' + b"1" * 5000 + b"}", p.WRONG_TYPE),
    (b'{"x_f0":1e300,"x_f1":2,"x_f2":3}', p.NON_FINITE),
    (b'{"x_f0":1,"x_f1":2,"x_f2":3}\x00', p.INVALID_JSON),
]


@pytest.mark.parametrize("value,error_class", BAD_JSON, ids=[c + str(i) for i, (_, c) in enumerate(BAD_JSON)])
def test_each_bad_json_record_is_isolated_and_classified(model, value, error_class):
    _, manifest = model
    good = b'{"x_f0":1,"x_f1":2,"x_f2":3}'
    decoded = decode(manifest, [good, value, good, good])
    assert decoded.good.tolist() == [0, 2, 3]
    assert decoded.rejected.rows.tolist() == [1]
    assert decoded.rejected.error_classes == (error_class,)
    assert decoded.rejected.messages[0]
    assert decoded.inputs["x"].shape == (3, 3)


def test_a_bom_and_whitespace_around_an_object_are_allowed(model):
    _, manifest = model
    values = [b'\xef\xbb\xbf{"x_f0":1,"x_f1":2,"x_f2":3}', b'\r\n {"x_f0":4,"x_f1":5,"x_f2":6}\t', b'{"x_f0":7,"x_f1":8,"x_f2":9}']
    decoded = decode(manifest, values)
    assert decoded.good.tolist() == [0, 1, 2]
    np.testing.assert_array_equal(decoded.inputs["x"], [[1, 2, 3], [4, 5, 6], [7, 8, 9]])


def test_the_last_of_a_repeated_field_counts_and_unread_fields_are_not_checked(model):
    """The same values whichever pass reads a record: msgspec takes the plain ones; a BOM sends one to
    pyarrow, which refuses a repeated field or NaN in an unread field, and its rewrite."""
    _, manifest = model
    bodies = [
        b'{"x_f0":1,"x_f1":2,"x_f2":3,"x_f0":4}',
        b'{"x_f0":1,"x_f1":2,"x_f2":3,"s":"\\ud800","n":NaN,"b":1e99999,"t":"\xff"}',
        b'{"x_f0":1,"x_f1":2,"x_f2":3,"x_f1":null}',
    ]
    for prefix in (b"", b"\xef\xbb\xbf"):
        decoded = decode(manifest, [prefix + body for body in bodies])
        assert decoded.good.tolist() == [0, 1], prefix
        np.testing.assert_array_equal(decoded.inputs["x"], [[4, 2, 3], [1, 2, 3]])
        assert decoded.rejected.error_classes == (p.MISSING_FEATURE,)


def test_values_over_the_limit_are_dead_lettered_without_their_value(model):
    _, manifest = model
    small, large = b'{"x_f0":1,"x_f1":2,"x_f2":3}', b'{"x_f0":1,"x_f1":2,"x_f2":3,"pad":"' + b"a" * 40 + b'"}'
    batch = kafka_batch([small, large, b"[" + b" " * 60 + b"]"])
    decoded = make_decoder(manifest, PayloadSettings(max_value_bytes=len(small))).decode(batch.column("value"))
    assert decoded.good.tolist() == [0]
    assert decoded.rejected.error_classes == (p.VALUE_TOO_LARGE, p.VALUE_TOO_LARGE)
    assert "payload.max_value_bytes" in decoded.rejected.messages[0]
    dead = Encoder(manifest, "o", "dead").dead_letters(batch, decoded.rejected)
    assert dead.column("value").to_pylist() == [None, None]
    assert dead.column("key").to_pylist() == [b"k1", b"k2"]
    assert dead.column("headers").to_pylist()[0][0] == {"key": "trace", "value": b"t1"}


def test_the_limit_leaves_tensor_values_alone(model):
    _, manifest = model
    row = np.arange(3, dtype="<f4").tobytes()
    decoded = make_decoder(manifest, PayloadSettings(format="tensor", max_value_bytes=4)).decode(pa.array([row], pa.binary()))
    assert decoded.good.tolist() == [0]


def test_list_input_checks_length_type_and_nulls():
    manifest = softmax_model([TensorSpec("v", "float32", (-1, 2, 2))])[1]
    values = [b'{"v":[1,2,3,4]}', b'{"v":[1,2,3]}', b'{"v":[1,null,3,4]}', b'{"v":"abc"}', b'{"w":1}', b'{"v":[1,2,3,"x"]}']
    decoded = decode(manifest, values)
    assert decoded.good.tolist() == [0]
    np.testing.assert_array_equal(decoded.inputs["v"], np.array([[[1, 2], [3, 4]]], np.float32))
    assert dict(zip(decoded.rejected.rows.tolist(), decoded.rejected.error_classes)) == {
        1: p.WRONG_LENGTH,
        2: p.WRONG_TYPE,
        3: p.WRONG_TYPE,
        4: p.MISSING_FEATURE,
        5: p.WRONG_TYPE,
    }


def test_two_inputs_decode_together():
    manifest = softmax_model([feature_spec("a", 2), TensorSpec("b", "float32", (-1, 3))])[1]
    decoded = decode(manifest, [b'{"a_f0":1,"a_f1":2,"b":[3,4,5]}', b'{"a_f0":1,"b":[3,4,5]}'])
    assert decoded.good.tolist() == [0] and decoded.rejected.error_classes == (p.MISSING_FEATURE,)
    np.testing.assert_array_equal(decoded.inputs["a"], [[1, 2]])
    np.testing.assert_array_equal(decoded.inputs["b"], [[3, 4, 5]])


def test_tensor_payload(model):
    _, manifest = model
    rows = np.arange(9, dtype="<f4").reshape(3, 3)
    values = [rows[0].tobytes(), rows[1].tobytes()[:8], None, rows[2].tobytes(), np.array([1, np.nan, 2], "<f4").tobytes()]
    decoded = decode(manifest, values, "tensor")
    assert decoded.good.tolist() == [0, 3]
    np.testing.assert_array_equal(decoded.inputs["x"], rows[[0, 2]])
    assert decoded.rejected.error_classes == (p.WRONG_TENSOR_LENGTH, p.EMPTY_VALUE, p.NON_FINITE)


def test_payload_must_fit_the_model():
    _, two_inputs = softmax_model([feature_spec("a", 2), feature_spec("b", 2)])
    with pytest.raises(ModelError, match="exactly one input"):
        make_decoder(two_inputs, PayloadSettings(format="tensor"))


def test_an_unknown_payload_format_is_refused_by_the_settings():
    from streamhydro.config import Config
    from streamhydro.errors import ConfigError

    with pytest.raises(ConfigError) as refused:
        Config().replace(payload={"format": "csv"})
    assert refused.value.key == "payload.format" and "json, avro, protobuf or tensor" in str(refused.value)


record = st.one_of(
    st.tuples(st.just("good"), st.lists(st.floats(-1e6, 1e6, width=32), min_size=3, max_size=3)),
    st.tuples(st.sampled_from([v for v, _ in BAD_JSON]), st.just(None)),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(record, max_size=60))
def test_random_mixes_keep_every_good_row_in_order(model, records):
    _, manifest = model
    values = [
        json.dumps({"x_f0": r[0], "x_f1": r[1], "x_f2": r[2]}).encode() if kind == "good" else kind
        for kind, r in records
    ]
    decoded = decode(manifest, values)
    expected_good = [i for i, (kind, _) in enumerate(records) if kind == "good"]
    assert decoded.good.tolist() == expected_good
    assert sorted(decoded.good.tolist() + decoded.rejected.rows.tolist()) == list(range(len(records)))
    expected = np.array([records[i][1] for i in expected_good], np.float32).reshape(-1, 3)
    np.testing.assert_array_equal(decoded.inputs["x"], expected)


def test_predictions_match_onnx_runtime_and_carry_source(model):
    data, manifest = model
    rows = np.random.default_rng(3).normal(size=(5, 3)).astype(np.float32)
    batch = kafka_batch(json_values(manifest, rows), first_offset=40)
    scores = ort.InferenceSession(data).run(None, {"x": rows})[0]
    out, rejected = Encoder(manifest, "preds", "dlq").predictions(batch, {"scores": scores})
    assert rejected.rows.size == 0
    assert out.schema == p.OUTPUT_ARROW_SCHEMA
    assert out.column("key").to_pylist() == batch.column("key").to_pylist()
    assert out.column("headers").to_pylist() == batch.column("headers").to_pylist()
    assert set(out.column("topic").to_pylist()) == {"preds"}
    for i, value in enumerate(out.column("value").to_pylist()):
        doc = json.loads(value.decode("utf-8"))
        assert doc["key"] == f"k{40 + i}"
        assert doc["prediction"]["label"] == LABELS[int(np.argmax(scores[i]))]
        np.testing.assert_allclose([doc["prediction"]["scores"][label] for label in LABELS], scores[i], rtol=1e-6)
        assert doc["model"] == {"name": "tiny", "version": 1}
        assert doc["source"] == {"topic": "in", "partition": 40 % 3, "offset": 40 + i, "timestamp_ms": 1767225600000 + i}
        assert doc["idempotency_key"] == f"in/{40 % 3}/{40 + i}"


def test_awkward_keys_and_scores_stay_valid_json(model):
    _, manifest = model
    keys = [b'quote"back\\slash', b"tab\tnewline\n\x01", None, b"\xff\xfe not utf8", "ünïcode".encode()]
    batch = kafka_batch([b"{}"] * 5, keys=keys)
    scores = np.array([[0.1, 0.2, 0.7], [np.nan, 0.5, 0.5], [np.inf, 0, 0], [1, 0, 0], [0, 1, 0]], np.float32)
    out, _ = Encoder(manifest, "o", "d").predictions(batch, {"scores": scores})
    docs = [json.loads(v) for v in out.column("value").to_pylist()]
    assert docs[0]["key"] == 'quote"back\\slash'
    assert docs[1]["key"] == "tab\tnewline\n\x01"
    assert docs[2]["key"] is None and "key_base64" not in docs[2]
    assert docs[3]["key"] is None and base64.b64decode(docs[3]["key_base64"]) == keys[3]
    assert docs[4]["key"] == "ünïcode"
    assert docs[1]["prediction"]["scores"]["neg"] is None
    assert docs[2]["prediction"]["scores"]["neg"] is None
    assert math.isclose(docs[0]["prediction"]["scores"]["odd"], 0.7, rel_tol=1e-6)


def test_dead_letters_keep_value_and_name_origin_and_error(model):
    _, manifest = model
    values = [b'{"x_f0":1,"x_f1":2,"x_f2":3}', b'{"x_f0":1', b""]
    batch = kafka_batch(values, first_offset=7)
    decoded = make_decoder(manifest, PayloadSettings()).decode(batch.column("value"))
    dead = Encoder(manifest, "o", "dead").dead_letters(batch, decoded.rejected)
    assert dead.schema == p.OUTPUT_ARROW_SCHEMA
    assert dead.column("value").to_pylist() == values[1:]
    assert dead.column("key").to_pylist() == [b"k8", b"k9"]
    assert dead.column("topic").to_pylist() == ["dead", "dead"]
    headers = dict((h["key"], h["value"]) for h in dead.column("headers").to_pylist()[0])
    assert headers["trace"] == b"t1"
    assert headers[p.HEADER_ORIGIN_TOPIC] == b"in"
    assert headers[p.HEADER_ORIGIN_PARTITION] == str(7 % 3).encode()
    assert headers[p.HEADER_ORIGIN_OFFSET] == b"8"
    assert headers[p.HEADER_ORIGIN_TIMESTAMP] == b"1767225600001"
    assert headers[p.HEADER_ERROR_CLASS] == p.INVALID_JSON.encode()
    assert headers[p.HEADER_ERROR_MESSAGE].startswith(b"not valid JSON")


def test_records_cannot_merge_into_one_row(model):
    """Two broken halves that would form one object, plus a value with two objects to even the count."""
    _, manifest = model
    good = b'{"x_f0":1,"x_f1":2,"x_f2":3}'
    values = [good, b'{"x_f0":7,"s":"}', b'{","x_f1":8,"x_f2":9}', good + b" " + good, b'  {"x_f0":4,"x_f1":5,"x_f2":6} ', good]
    decoded = decode(manifest, values)
    assert decoded.good.tolist() == [0, 4, 5]
    np.testing.assert_array_equal(decoded.inputs["x"], [[1, 2, 3], [4, 5, 6], [1, 2, 3]])
    assert decoded.rejected.error_classes == (p.INVALID_JSON, p.INVALID_JSON, p.MULTIPLE_OBJECTS)
