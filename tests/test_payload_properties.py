"""Whatever a record's bytes, it gets exactly one outcome: a prediction or a dead letter with its origin.

Property tests of the payload codecs over arbitrary bytes and arbitrary JSON placed among good
records, of the encoder over arbitrary keys, headers and scores, and of the scoring function (called
on Arrow batches without Spark) with a fault injected into decoding or encoding of one record.
"""

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

from _inference_models import LABELS, Holder, feature_spec, json_values, kafka_batch, mixed_manifest, softmax_model
from streamhydro import payload as p
from streamhydro.executor.scoring import EngineSettings, ScoringPlan, score_batches
from streamhydro.payload import encoding
from streamhydro.config import PayloadSettings
from streamhydro.payload.formats import json as json_format
from streamhydro.payload.formats import make_decoder
from streamhydro.payload.encoding import Encoder
from streamhydro.registry import TensorSpec

FAST = settings(max_examples=120, deadline=None)
BOM = b"\xef\xbb\xbf"

FEATURES = feature_spec("x", 3)
_, FEATURE_MODEL = softmax_model([FEATURES])
_, MIXED_MODEL = softmax_model([FEATURES, TensorSpec("v", "float32", (-1, 2))])
GOOD_MIXED = b'{"x_f0":1,"x_f1":-2.5,"x_f2":3e3,"v":[4,5]}'

# Arbitrary JSON: unicode (lone surrogates included, written as \ud800 escapes or as raw CESU bytes),
# integers beyond 2**64, NaN and Infinity literals, nested containers, the model's own field names.
text = st.text(st.characters(exclude_categories=()), max_size=8)
names = st.one_of(st.sampled_from(["x_f0", "x_f1", "x_f2", "v"]), text)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**80), 2**80), st.floats(), text)
documents = st.recursive(
    scalars, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(names, inner, max_size=4)), max_leaves=12
)
dumped = st.one_of(
    documents.map(lambda d: json.dumps(d).encode()),
    documents.map(lambda d: json.dumps(d, ensure_ascii=False).encode("utf-8", "surrogatepass")),
)
numbers = st.sampled_from(
    [b"1e400", b"-1e400", b"1e300", b"-0", b"NaN", b"-Infinity", b"1" * 5000, str(2**64 + 1).encode(), b"1e-400", b"01", b"1."]
)
field_numbers = numbers.flatmap(
    lambda n: st.sampled_from(
        [
            b'{"x_f0":%s,"x_f1":2,"x_f2":3,"v":[4,5]}' % n,
            b'{"x_f0":1,"x_f1":2,"x_f2":3,"v":[4,%s]}' % n,
            b'{"x_f0":1,"x_f1":2,"x_f2":3,"v":[4,5],"other":%s}' % n,
            b'{"x_f0":"a","x_f1":2,"x_f2":3,"v":[4,5],"other":%s}' % n,
        ]
    )
)
nested = st.tuples(st.integers(1, 5000), st.sampled_from([b"[%s]", b'{"x_f0":%s}', b'{"x_f0":1,"x_f1":2,"x_f2":3,"v":[4,5],"a":%s}'])).map(
    lambda t: t[1] % (b"[" * t[0] + b"]" * t[0])
)
unclosed = st.integers(1, 5000).map(lambda d: b'{"a":' * d + b"1")
long_strings = st.integers(0, 200_000).map(lambda n: GOOD_MIXED[:-1] + b',"s":"' + b"a" * n + b'"}')
duplicates = st.sampled_from([b"1", b'"a"', b"null", b"[]"]).map(lambda v: b'{"x_f0":1,"x_f1":2,"x_f2":3,"v":[4,5],"x_f0":%s}' % v)
tokens = st.lists(
    st.sampled_from([b"{", b"}", b"[", b"]", b",", b":", b'"x_f0"', b'"v"', b"null", b"1", b"NaN", b"\n", b" ", b"\x00",
                     BOM, b'"\\ud800"', b'"', b"\\", b"\xff", b"true"]),
    max_size=30,
).map(b"".join)
framed = st.tuples(
    st.sampled_from([b"", BOM, b" ", b"\n", b"\r\n\t", b"\x00", b"null ", b"[]"]),
    st.one_of(st.just(GOOD_MIXED), dumped),
    st.sampled_from([b"", b" ", b"\n", b"\x00", b" null", b"}", b"{}", b"\xff", GOOD_MIXED]),
).map(b"".join)
# Values that crashed the decoder before: a top-level null (segmentation fault in pyarrow), deep
# nesting (RecursionError), a 5000-digit integer (ValueError) in a record pyarrow refuses.
regressions = st.sampled_from(
    [b"null", b" null", b"null {}", b"[" * 5000 + b"]" * 5000, b'{"x_f0":' + b"[" * 5000 + b"]" * 5000 + b"}",
     b'{"x_f0":"a","x_f1":2,"x_f2":3,"v":[4,5],"n":' + b"1" * 5000 + b"}"]
)
anything = st.one_of(
    st.none(), st.binary(max_size=64), dumped, field_numbers, nested, unclosed, long_strings, duplicates, tokens, framed,
    regressions,
)


def outcome(decoded, position: int):
    """("good", {input: row}) or ("bad", error class) for one position of a decoded batch."""
    good = decoded.good.tolist()
    if position in good:
        i = good.index(position)
        return "good", {name: array[i].tolist() for name, array in decoded.inputs.items()}
    return "bad", decoded.rejected.error_classes[decoded.rejected.rows.tolist().index(position)]


def check_dead_letters(batch: pa.RecordBatch, rejected: p.Rejected) -> None:
    dead = Encoder(FEATURE_MODEL, "out", "dead").dead_letters(batch, rejected)
    values = batch.column("value").to_pylist()
    assert dead.column("topic").to_pylist() == ["dead"] * len(rejected.rows)
    for row, error_class, value, headers in zip(
        rejected.rows.tolist(), rejected.error_classes, dead.column("value").to_pylist(), dead.column("headers").to_pylist()
    ):
        added = {h["key"]: h["value"] for h in headers}
        assert added[p.HEADER_ORIGIN_OFFSET] == str(row).encode()
        assert added[p.HEADER_ERROR_CLASS] == error_class.encode()
        assert value == (None if error_class == p.VALUE_TOO_LARGE else values[row])


@FAST
@given(st.lists(st.one_of(st.just(GOOD_MIXED), anything), min_size=1, max_size=12))
def test_any_value_gets_the_outcome_it_gets_alone(values):
    decoder = make_decoder(MIXED_MODEL, PayloadSettings())
    batch = kafka_batch(values)
    decoded = decoder.decode(batch.column("value"))
    assert sorted(decoded.good.tolist() + decoded.rejected.rows.tolist()) == list(range(len(values)))
    assert decoded.good.tolist() == sorted(decoded.good.tolist())
    assert decoded.rejected.rows.tolist() == sorted(decoded.rejected.rows.tolist())
    assert set(decoded.rejected.error_classes) <= set(p.ERROR_CLASSES) - {p.UNEXPECTED_ERROR}
    assert all(decoded.rejected.messages)
    for position, value in enumerate(values):
        alone = decoder.decode(pa.array([value], pa.binary()))
        assert outcome(decoded, position) == outcome(alone, 0), value
        if value == GOOD_MIXED:
            assert outcome(decoded, position) == ("good", {"x": [1, -2.5, 3000], "v": [4, 5]})
    check_dead_letters(batch, decoded.rejected)


# A feature's JSON text and what the decoder must make of it: a float32 value or an error class.
finite_feature = st.one_of(
    st.floats(width=32, allow_nan=False, allow_infinity=False).map(lambda x: (json.dumps(x), np.float32(x))),
    st.integers(-(2**70), 2**70).map(lambda i: (str(i), np.float32(i))),
)
bad_feature = st.one_of(
    st.floats(min_value=3.5e38, max_value=1e308).map(lambda x: (json.dumps(x), p.NON_FINITE)),
    st.integers(2**129, 2**1200).map(lambda i: (str(i), p.NON_FINITE)),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "-1e400", "9" * 5000]).map(lambda t: (t, p.NON_FINITE)),
    st.one_of(st.booleans(), text, st.lists(st.integers(), max_size=2), st.dictionaries(text, st.integers(), max_size=2)).map(
        lambda v: (json.dumps(v), p.WRONG_TYPE)
    ),
    st.sampled_from([(None, p.MISSING_FEATURE), ("null", p.MISSING_FEATURE)]),
)
extras = st.dictionaries(
    st.text(max_size=6).filter(lambda k: not k.startswith("x_f")),
    st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(-(2**80), 2**80), st.floats(), st.text(max_size=6)),
        lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
        max_leaves=8,
    ),
    max_size=3,
)


@st.composite
def feature_documents(draw):
    """(record value, expected row or the set of error classes its bad features can give)."""
    features = [draw(st.one_of(finite_feature, bad_feature)) for _ in FEATURES.features]
    fields = [f'"{name}":{json_text}' for name, (json_text, _) in zip(FEATURES.features, features) if json_text is not None]
    fields += [f"{json.dumps(key)}:{json.dumps(value)}" for key, value in draw(extras).items()]
    order = draw(st.permutations(fields))
    value = ("{" + ",".join(order) + "}").encode()
    bad = {verdict for _, verdict in features if isinstance(verdict, str)}
    return value, (bad or np.array([verdict for _, verdict in features], np.float32))


@FAST
@given(st.lists(feature_documents(), max_size=20))
def test_json_documents_decode_to_their_features_or_the_class_of_a_bad_one(records):
    batch = kafka_batch([value for value, _ in records])
    decoded = make_decoder(FEATURE_MODEL, PayloadSettings()).decode(batch.column("value"))
    expected_good = [i for i, (_, verdict) in enumerate(records) if isinstance(verdict, np.ndarray)]
    assert decoded.good.tolist() == expected_good
    expected = np.array([records[i][1] for i in expected_good], np.float32).reshape(-1, 3)
    np.testing.assert_allclose(decoded.inputs["x"], expected, rtol=1e-6)
    assert len(decoded.good) + len(decoded.rejected.rows) == len(records)
    for row, error_class in zip(decoded.rejected.rows.tolist(), decoded.rejected.error_classes):
        assert error_class in records[row][1], records[row][0]
    check_dead_letters(batch, decoded.rejected)


TYPED_MODEL = mixed_manifest("typed", vector="float64", count="int32")
typed_value = st.one_of(scalars, st.lists(st.one_of(st.floats(), st.integers(-(2**70), 2**70)), min_size=2, max_size=4))
finite = st.one_of(
    st.floats(-1000, 1000), st.floats(-1e30, 1e30), st.integers(-(2**40), 2**40), st.floats(allow_nan=False, allow_infinity=False), st.integers(-(2**70), 2**70)
)
TYPED_FIELDS = {
    ("user", "age"): finite,
    ("user", "city"): st.one_of(st.text(max_size=8), text),
    ("tx", "amount"): finite,
    ("tx", "items"): st.one_of(st.integers(-(2**32), 2**32), st.integers(-(2**32), 2**32).map(float), st.floats(-1e10, 1e10)),
    ("doc", "embedding"): st.lists(finite, min_size=3, max_size=3),
    ("vip",): st.booleans(),
}


def _dumps(pairs, ascii_only: bool) -> str:
    """JSON text of an object given as (name, value) pairs (repeated names kept); nested lists of pairs are objects."""
    if isinstance(pairs, list) and all(isinstance(item, tuple) for item in pairs):
        return "{" + ",".join(f"{json.dumps(k, ensure_ascii=ascii_only)}:{_dumps(v, ascii_only)}" for k, v in pairs) + "}"
    return json.dumps(pairs, ensure_ascii=ascii_only)


@st.composite
def typed_values(draw):
    """Events for TYPED_MODEL: most fields of the right JSON type (so many records are plain), some
    of any type, absent, repeated at their level with another value, extra fields, a BOM or padding."""
    top: dict[str, list] = {}
    for path, good in TYPED_FIELDS.items():
        if draw(st.integers(0, 31)) == 0:
            continue
        value = draw(good) if draw(st.integers(0, 15)) else draw(typed_value)
        if len(path) == 1:
            top[path[0]] = value
            continue
        pairs = top.setdefault(path[0], [])
        pairs.append((path[1], value))
        if draw(st.integers(0, 9)) == 0:
            pairs.insert(draw(st.integers(0, len(pairs))), (path[1], draw(good)))
    document = list(top.items())
    if draw(st.booleans()):
        document.insert(draw(st.integers(0, len(document))), (draw(text), draw(documents)))
    body = _dumps(document, ascii_only=draw(st.booleans())).encode("utf-8", "surrogatepass")
    return draw(st.sampled_from([b""] * 8 + [BOM, b" "])) + body


@FAST
@given(st.data())
def test_the_msgspec_pass_reads_what_the_pyarrow_pass_reads(data):
    """Whichever pass reads a record, it gets the same outcome: every record decoded as the batch it is in,
    and by the general (pyarrow and Python) pass alone."""
    manifest, records = data.draw(
        st.one_of(
            st.tuples(st.just(MIXED_MODEL), st.lists(st.one_of(st.just(GOOD_MIXED), anything), min_size=1, max_size=12)),
            st.tuples(st.just(TYPED_MODEL), st.lists(typed_values(), min_size=1, max_size=12)),
        )
    )
    decoder = make_decoder(manifest, PayloadSettings())
    values = pa.array(records, pa.binary())
    both = decoder.decode(values)
    general = decoder._decode_general(values)
    for position, value in enumerate(records):
        assert outcome(both, position) == outcome(general, position), value


@FAST
@given(st.lists(st.one_of(st.just(b'{"x_f0":1,"x_f1":2,"x_f2":3}'), anything), max_size=12), st.integers(1, 80))
def test_values_over_the_limit_are_rejected_unparsed_and_not_copied(values, limit):
    batch = kafka_batch(values)
    decoded = make_decoder(FEATURE_MODEL, PayloadSettings(max_value_bytes=limit)).decode(batch.column("value"))
    too_large = [i for i, v in enumerate(values) if v is not None and len(v) > limit]
    classes = dict(zip(decoded.rejected.rows.tolist(), decoded.rejected.error_classes))
    assert [i for i, c in classes.items() if c == p.VALUE_TOO_LARGE] == too_large
    assert len(decoded.good) + len(decoded.rejected.rows) == len(values)
    check_dead_letters(batch, decoded.rejected)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 64), st.sets(st.integers(0, 63)))
def test_isolate_runs_everything_but_the_records_that_raise(n, poison):
    poison = {i for i in poison if i < n}

    def run(lo: int, hi: int) -> list[int]:
        hit = poison.intersection(range(lo, hi))
        if hit:
            raise KeyError(min(hit))
        return list(range(lo, hi))

    rejections = p.Rejections()
    parts = p.isolate(run, n, rejections)
    assert [i for lo, part in parts for i in part] == [i for i in range(n) if i not in poison]
    assert all(part[0] == lo for lo, part in parts if part)
    rejected = rejections.result()
    assert rejected.rows.tolist() == sorted(poison)
    assert set(rejected.error_classes) <= {p.UNEXPECTED_ERROR}
    assert set(rejected.exceptions) <= {"builtins.KeyError"}


def test_isolate_lets_memory_errors_and_empty_batches_fail():
    def out_of_memory(lo, hi):
        raise MemoryError

    with pytest.raises(MemoryError):
        p.isolate(out_of_memory, 8, p.Rejections())
    with pytest.raises(ZeroDivisionError):
        p.isolate(lambda lo, hi: 1 / 0, 0, p.Rejections())


keys = st.one_of(st.none(), st.binary(max_size=12), text.map(lambda t: t.encode("utf-8", "surrogatepass")))
headers = st.lists(st.fixed_dictionaries({"key": st.text(max_size=6), "value": st.one_of(st.none(), st.binary(max_size=8))}), max_size=3)
scores = st.floats(width=32)


@FAST
@given(st.lists(st.tuples(keys, headers, st.tuples(scores, scores, scores)), min_size=1, max_size=10), st.text(max_size=6))
def test_encoded_predictions_are_always_valid_json(rows, topic):
    batch = kafka_batch([b"{}"] * len(rows), keys=[key for key, _, _ in rows], topic=topic)
    batch = batch.set_column(batch.schema.get_field_index("headers"), "headers", pa.array([h for _, h, _ in rows], p.HEADERS_TYPE))
    matrix = np.array([s for _, _, s in rows], np.float32).reshape(-1, 3)
    out, rejected = Encoder(FEATURE_MODEL, "out", "dead").predictions(batch, {"scores": matrix})
    assert rejected.rows.size == 0
    assert out.column("key").to_pylist() == [key for key, _, _ in rows]
    assert out.column("headers").to_pylist() == [h for _, h, _ in rows]
    for (key, _, row_scores), value in zip(rows, out.column("value").to_pylist()):
        doc = json.loads(value.decode("utf-8"))
        try:
            assert doc["key"] == (None if key is None else key.decode("utf-8")) and "key_base64" not in doc
        except UnicodeDecodeError:
            assert doc["key"] is None and base64.b64decode(doc["key_base64"]) == key
        assert doc["source"]["topic"] == topic
        for label, score in zip(LABELS, row_scores):
            written = doc["prediction"]["scores"][label]
            assert written is None if not math.isfinite(score) else np.float32(written) == np.float32(score)
        assert doc["prediction"]["label"] == LABELS[int(np.argmax(np.array(row_scores, np.float32)))]


@FAST
@given(st.lists(st.tuples(st.sampled_from(p.ERROR_CLASSES), text, st.sampled_from(["", "builtins.ValueError"])), max_size=6))
def test_dead_letters_carry_any_message(problems):
    batch = kafka_batch([b"x"] * len(problems))
    rejections = p.Rejections()
    for row, (error_class, message, exception) in enumerate(problems):
        rejections.add(row, error_class, message, exception)
    dead = Encoder(FEATURE_MODEL, "out", "dead").dead_letters(batch, rejections.result())
    for (error_class, message, exception), headers in zip(problems, dead.column("headers").to_pylist()):
        added = {h["key"]: h["value"] for h in headers}
        assert added[p.HEADER_ERROR_MESSAGE].decode("utf-8") == message[: p.MESSAGE_LIMIT].encode("utf-8", "backslashreplace").decode()
        assert added.get(p.HEADER_ERROR_EXCEPTION, b"") == exception.encode()


POISON = b'{"x_f0":1,"poison":'


def _score_with_one_poisoned_record(manifest, data, values, keys=None):
    """Score one Kafka batch through the mapInArrow function, outside Spark; dead letters and predictions by offset."""
    plan = ScoringPlan(manifest, Holder(data), PayloadSettings(), "preds", "dead", EngineSettings(batch_size=8, pipeline_depth=2))
    out = pa.Table.from_batches(list(score_batches(plan)(iter([kafka_batch(values, keys=keys)]))))
    dead, predictions = {}, {}
    for value, topic, headers in zip(*(out.column(c).to_pylist() for c in ("value", "topic", "headers"))):
        if topic == "dead":
            added = {h["key"]: h["value"] for h in headers}
            dead[int(added[p.HEADER_ORIGIN_OFFSET])] = (value, added)
        else:
            doc = json.loads(value)
            predictions[doc["source"]["offset"]] = [doc["prediction"]["scores"][label] for label in LABELS]
    return dead, predictions


def test_a_record_whose_decoding_raises_is_dead_lettered_alone(monkeypatch):
    data, manifest = softmax_model([feature_spec("x", 4)])
    rows = np.random.default_rng(11).normal(size=(40, 4)).astype(np.float32)
    values = json_values(manifest, rows)
    values[13], values[27] = POISON, b'{"x_f0":1'
    classify = json_format.Decoder._classify

    def raising_on_poison(self, record, parsed_rows, failure, rewrite):
        if record == POISON:
            raise LookupError("injected fault")
        return classify(self, record, parsed_rows, failure, rewrite)

    monkeypatch.setattr(json_format.Decoder, "_classify", raising_on_poison)
    dead, predictions = _score_with_one_poisoned_record(manifest, data, values)
    assert sorted(dead) == [13, 27]
    value, added = dead[13]
    assert value == POISON
    assert added[p.HEADER_ERROR_CLASS] == p.UNEXPECTED_ERROR.encode()
    assert added[p.HEADER_ERROR_EXCEPTION] == b"builtins.LookupError"
    assert b"injected fault" in added[p.HEADER_ERROR_MESSAGE]
    assert dead[27][1][p.HEADER_ERROR_CLASS] == p.INVALID_JSON.encode()
    expected = ort.InferenceSession(data).run(None, {"x": rows})[0]
    assert sorted(predictions) == sorted(set(range(40)) - {13, 27})
    for offset, got in predictions.items():
        np.testing.assert_allclose(got, expected[offset], rtol=1e-5, atol=1e-7)


def test_a_record_whose_encoding_raises_is_dead_lettered_alone(monkeypatch):
    data, manifest = softmax_model([feature_spec("x", 4)])
    rows = np.random.default_rng(12).normal(size=(30, 4)).astype(np.float32)
    values = json_values(manifest, rows)
    keys = [f"k{i}".encode() for i in range(30)]
    keys[21] = b"poison-key"
    key_json = encoding._key_json

    def raising_on_poison(column):
        if b"poison-key" in column.to_pylist():
            raise OverflowError("injected fault")
        return key_json(column)

    monkeypatch.setattr(encoding, "_key_json", raising_on_poison)
    dead, predictions = _score_with_one_poisoned_record(manifest, data, values, keys)
    assert sorted(dead) == [21]
    value, added = dead[21]
    assert value == values[21]
    assert added[p.HEADER_ERROR_CLASS] == p.UNEXPECTED_ERROR.encode()
    assert added[p.HEADER_ERROR_EXCEPTION] == b"builtins.OverflowError"
    assert sorted(predictions) == sorted(set(range(30)) - {21})
