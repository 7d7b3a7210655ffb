"""Payload formats with plain pyarrow: nested JSON paths, typed inputs, Avro and Protobuf (bare and in the
Confluent wire format), and the schemas the load generator derives.

Registry schemas reach the decoders through the per-worker cache (``schemas.remember``), as a fetched
schema would; the real-registry test lives with the broker tests.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from _inference_models import mixed_manifest
from streamhydro import payload as p
from streamhydro.config import PayloadSettings
from streamhydro.errors import ModelError, SchemaRegistryError
from streamhydro.payload import schemas
from streamhydro.payload.formats import avro, make_decoder, protobuf
from streamhydro.payload.formats import json as json_format
from streamhydro.producer import UNKNOWN_SCHEMA_ID, EventFormat, corrupt, make_values
from streamhydro.registry import Manifest, TensorSpec

URL = "http://registry.invalid:8081"
FAST = settings(max_examples=60, deadline=None)

MANIFEST = mixed_manifest()


def event(age=30.0, amount=2.5, city="Oslo", vip=True, items=3, embedding=(1.0, 2.0, 3.0)):
    return {"user": {"age": age, "city": city}, "tx": {"amount": amount, "items": items}, "doc": {"embedding": list(embedding)}, "vip": vip}


def expected_inputs(events):
    return {
        "num": np.array([[e["user"]["age"], e["tx"]["amount"]] for e in events], np.float32).reshape(-1, 2),
        "vec": np.array([e["doc"]["embedding"] for e in events], np.float32).reshape(-1, 3),
        "city": np.array([[e["user"]["city"]] for e in events], dtype=object).reshape(-1, 1),
        "flag": np.array([e["vip"] for e in events], bool),
        "count": np.array([[e["tx"]["items"]] for e in events], np.int64).reshape(-1, 1),
    }


def assert_inputs(decoded, events):
    expected = expected_inputs(events)
    assert set(decoded.inputs) == set(expected)
    for name, want in expected.items():
        got = decoded.inputs[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        np.testing.assert_array_equal(got, want)


def decode(settings_, values, manifest=MANIFEST):
    return make_decoder(manifest, settings_).decode(pa.array(values, pa.binary()))


def outcomes(decoded):
    return dict(zip(decoded.rejected.rows.tolist(), decoded.rejected.error_classes))


@pytest.fixture(scope="module")
def avro_schema():
    return avro.schema_for(MANIFEST)


@pytest.fixture(scope="module")
def proto_schema():
    return protobuf.proto_for(MANIFEST)


@pytest.fixture(autouse=True)
def registry_cache(monkeypatch):
    """An empty schema cache whose clock stands still: a remembered miss stays a miss for the whole test."""
    schemas.forget_all()
    monkeypatch.setattr(schemas, "_now", lambda: 0.0)
    yield
    schemas.forget_all()


def test_a_found_schema_is_kept_and_an_unknown_id_is_asked_again_after_a_while(monkeypatch):
    now, asked = [0.0], []
    registered = schemas.RegisteredSchema("AVRO", '"string"')
    answers = {7: None}
    monkeypatch.setattr(schemas, "_now", lambda: now[0])
    monkeypatch.setattr(schemas, "client", lambda url, settings: None)
    monkeypatch.setattr(schemas, "_fetch", lambda registry, url, schema_id: asked.append(schema_id) or answers[schema_id])
    assert schemas.schema(URL, {}, 7) is None
    assert schemas.schema(URL, {}, 7) is None and asked == [7], "a miss is remembered for a while"
    answers[7] = registered  # a producer registers a schema, which gets id 7
    now[0] = schemas.MISS_RETRY_S + 0.1
    assert schemas.schema(URL, {}, 7) == registered and asked == [7, 7]
    now[0] += 3600
    assert schemas.schema(URL, {}, 7) == registered and asked == [7, 7], "a found schema is never asked again"


# --- JSON -------------------------------------------------------------------------------------------


def test_json_nested_paths_vectors_and_typed_inputs():
    events = [event(), event(age=-1.5, city="Bergen", vip=False, items=-7, embedding=(0, 0.5, 9))]
    values = [json.dumps({**e, "extra": {"deep": [1, {"x": None}]}, "user": {**e["user"], "unused": "z"}}).encode() for e in events]
    decoded = decode(PayloadSettings(), values)
    assert decoded.good.tolist() == [0, 1] and decoded.rejected.rows.size == 0
    assert_inputs(decoded, events)


BAD_JSON_FIELDS = [
    (event(age="old"), p.WRONG_TYPE),
    (event(city=5), p.WRONG_TYPE),
    (event(vip=1), p.WRONG_TYPE),
    (event(items=2.5), p.WRONG_TYPE),
    (event(items=1e30), p.NON_FINITE),
    (event(age=1e300), p.NON_FINITE),
    (event(embedding=(1, 2)), p.WRONG_LENGTH),
    (event(embedding=(1, None, 3)), p.WRONG_TYPE),
    (event(embedding=(1, "2", 3)), p.WRONG_TYPE),
    ({**event(), "user": None}, p.MISSING_FEATURE),
    ({**event(), "user": 5}, p.WRONG_TYPE),
    ({**event(), "user": {"city": "x"}}, p.MISSING_FEATURE),
    ({**event(), "doc": {"embedding": "abc"}}, p.WRONG_TYPE),
    ({k: v for k, v in event().items() if k != "vip"}, p.MISSING_FEATURE),
]


@pytest.mark.parametrize("document,error_class", BAD_JSON_FIELDS, ids=[f"{c}{i}" for i, (_, c) in enumerate(BAD_JSON_FIELDS)])
def test_json_bad_fields_are_classified_between_good_neighbours(document, error_class):
    good = json.dumps(event()).encode()
    decoded = decode(PayloadSettings(), [good, json.dumps(document).encode(), good])
    assert decoded.good.tolist() == [0, 2]
    assert outcomes(decoded) == {1: error_class}
    assert_inputs(decoded, [event(), event()])


def test_json_repeated_nested_field_takes_the_last_and_model_text_must_be_utf8():
    value = b'{"user":{"age":1,"city":"a","age":2},"tx":{"amount":1,"items":1},"doc":{"embedding":[1,2,3]},"vip":true}'
    decoded = decode(PayloadSettings(), [value, b"\xef\xbb\xbf" + value])
    assert decoded.good.tolist() == [0, 1]
    np.testing.assert_array_equal(decoded.inputs["num"], [[2, 1], [2, 1]])
    surrogate = value.replace(b'"city":"a"', b'"city":"\\ud800"')
    invalid = value.replace(b'"city":"a"', b'"city":"\xff"')
    assert outcomes(decode(PayloadSettings(), [surrogate, invalid, b" " + invalid, value])) == {0: p.INVALID_JSON, 1: p.INVALID_JSON, 2: p.INVALID_JSON}


def test_integer_inputs_take_whole_numbers_in_range():
    manifest = Manifest("ints", 1, "0", (TensorSpec("i", "int32", (-1, 2), ("a", "b")),), (), (), "")
    values = [b'{"a":1,"b":-2}', b'{"a":1.0,"b":2e3}', b'{"a":1.5,"b":2}', b'{"a":3e9,"b":2}', b'{"a":NaN,"b":2}']
    decoded = decode(PayloadSettings(), values, manifest)
    assert decoded.good.tolist() == [0, 1]
    np.testing.assert_array_equal(decoded.inputs["i"], np.array([[1, -2], [1, 2000]], np.int32))
    assert outcomes(decoded) == {2: p.WRONG_TYPE, 3: p.NON_FINITE, 4: p.NON_FINITE}


# --- mapping checks ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "inputs,problem",
    [
        ((TensorSpec("x", "float32", (-1, 2), ("a", "a")),), "more than one input column"),
        ((TensorSpec("x", "float32", (-1, 2), ("a", "a.b")),), "a value or an object"),
        ((TensorSpec("x", "float32", (-1, 2), ("a",)),), "width is 2"),
        ((TensorSpec("x", "float32", (-1, 2), ("a..b", "c")),), "empty part"),
        ((TensorSpec("x", "complex64", (-1, 1), ("a",)),), "dtype"),
        ((TensorSpec("x", "float32", (-1, -1)),), "dynamic"),
        ((TensorSpec("x", "float32", (-1, 1), ("a",), field="b"),), "both"),
    ],
)
def test_mappings_every_format_refuses(inputs, problem):
    manifest = Manifest("m", 1, "0", inputs, (), (), "")
    with pytest.raises(ModelError, match=problem):
        make_decoder(manifest, PayloadSettings())


def test_tensor_needs_one_float_input():
    with pytest.raises(ModelError, match="exactly one input"):
        make_decoder(MANIFEST, PayloadSettings(format="tensor"))
    ints = Manifest("m", 1, "0", (TensorSpec("x", "int64", (-1, 2)),), (), (), "")
    with pytest.raises(ModelError, match="float32"):
        make_decoder(ints, PayloadSettings(format="tensor"))


# --- Avro -------------------------------------------------------------------------------------------


def test_avro_bare_with_a_fixed_schema(tmp_path, avro_schema):
    path = tmp_path / "events.avsc"
    path.write_text(json.dumps(avro_schema))
    events = [event(), event(age=7.25, city="Tromsø", vip=False, items=2**40)]
    values = avro.encode(events, avro_schema)
    settings_ = PayloadSettings(format="avro", schema=str(path))
    decoded = decode(settings_, [values[0], values[0][:-1], values[0] + b"\x00", b"", values[1]])
    assert decoded.good.tolist() == [0, 4]
    assert outcomes(decoded) == {1: p.INVALID_AVRO, 2: p.INVALID_AVRO, 3: p.EMPTY_VALUE}
    assert_inputs(decoded, [events[0], events[1]])


def test_avro_wire_format_groups_records_by_schema_id(avro_schema):
    other = {**avro_schema, "fields": [{"name": "note", "type": "string"}, *avro_schema["fields"]]}
    schemas.remember(URL, 1, schemas.RegisteredSchema("AVRO", json.dumps(avro_schema)))
    schemas.remember(URL, 2, schemas.RegisteredSchema("AVRO", json.dumps(other)))
    schemas.remember(URL, 3, None)
    events = [event(age=float(i)) for i in range(4)]
    one = avro.encode(events[:2], avro_schema, schema_id=1)
    two = avro.encode([{**e, "note": "hi"} for e in events[2:]], other, schema_id=2)
    unknown = avro.encode(events[:1], avro_schema, schema_id=3)[0]
    values = [two[0], one[0], b"\x01" + one[0][1:], unknown, b"\x00\x00", one[1], two[1]]
    decoded = decode(PayloadSettings(format="avro", schema_registry_url=URL), values)
    assert decoded.good.tolist() == [0, 1, 5, 6]
    assert outcomes(decoded) == {2: p.NOT_WIRE_FORMAT, 3: p.UNKNOWN_SCHEMA, 4: p.NOT_WIRE_FORMAT}
    assert_inputs(decoded, [events[2], events[0], events[1], events[3]])


def test_avro_unions_with_null_and_enums_feed_inputs():
    schema = {
        "type": "record", "name": "E", "fields": [
            {"name": "user", "type": ["null", {"type": "record", "name": "U", "fields": [
                {"name": "age", "type": ["null", "int"]},
                {"name": "city", "type": {"type": "enum", "name": "City", "symbols": ["Oslo", "Bergen"]}},
            ]}]},
            {"name": "tx", "type": {"type": "record", "name": "T", "fields": [{"name": "amount", "type": "double"}, {"name": "items", "type": "long"}]}},
            {"name": "doc", "type": {"type": "record", "name": "D", "fields": [{"name": "embedding", "type": {"type": "array", "items": "float"}}]}},
            {"name": "vip", "type": "boolean"},
        ],
    }
    schemas.remember(URL, 5, schemas.RegisteredSchema("AVRO", json.dumps(schema)))
    good = event(age=40, city="Bergen")
    values = avro.encode([good, {**good, "user": None}, {**good, "user": {"age": None, "city": "Oslo"}}], schema, schema_id=5)
    decoded = decode(PayloadSettings(format="avro", schema_registry_url=URL), values)
    assert decoded.good.tolist() == [0]
    assert outcomes(decoded) == {1: p.MISSING_FEATURE, 2: p.MISSING_FEATURE}
    assert_inputs(decoded, [good])


def test_avro_schema_that_cannot_feed_the_model(tmp_path, avro_schema):
    wrong = json.loads(json.dumps(avro_schema))
    wrong["fields"][0]["type"]["fields"][1]["type"] = "double"  # user.city a number
    path = tmp_path / "wrong.avsc"
    path.write_text(json.dumps(wrong))
    with pytest.raises(ModelError, match="user.city"):
        make_decoder(MANIFEST, PayloadSettings(format="avro", schema=str(path)))
    missing = json.loads(json.dumps(avro_schema))
    missing["fields"] = missing["fields"][1:]
    path.write_text(json.dumps(missing))
    with pytest.raises(ModelError, match="no field 'user'"):
        make_decoder(MANIFEST, PayloadSettings(format="avro", schema=str(path)))
    schemas.remember(URL, 8, schemas.RegisteredSchema("AVRO", json.dumps(wrong)))
    values = [schemas.wire_header(8) + b"\x00"]
    decoded = decode(PayloadSettings(format="avro", schema_registry_url=URL), values)
    assert decoded.rejected.error_classes == (p.WRONG_TYPE,) and "schema id 8" in decoded.rejected.messages[0]


def test_an_unreachable_registry_fails_the_batch_instead_of_dead_lettering_it(avro_schema):
    value = avro.encode([event()], avro_schema, schema_id=4)[0]
    decoder = make_decoder(MANIFEST, PayloadSettings(format="avro", schema_registry_url="http://127.0.0.1:1"))
    with pytest.raises(SchemaRegistryError, match="127.0.0.1:1"):
        decoder.decode(pa.array([value], pa.binary()))


# --- Protobuf ---------------------------------------------------------------------------------------


def test_protobuf_bare_with_a_fixed_schema(tmp_path, proto_schema):
    path = tmp_path / "events.proto"
    path.write_text(proto_schema)
    events = [event(), event(age=-3.0, city="Bodø", vip=False, items=-(2**40))]
    values = protobuf.encode(events, protobuf.message_class(proto_schema))
    decoded = decode(PayloadSettings(format="protobuf", schema=str(path)), [values[0], values[0] + b"\xff", None, values[1]])
    assert decoded.good.tolist() == [0, 3]
    assert outcomes(decoded) == {1: p.INVALID_PROTOBUF, 2: p.EMPTY_VALUE}
    assert_inputs(decoded, events)


def test_protobuf_wire_format_with_message_indexes(proto_schema):
    text = proto_schema.replace("message Event {", "message Other {\n  optional string a = 1;\n}\n\nmessage Event {")
    schemas.remember(URL, 11, schemas.RegisteredSchema("PROTOBUF", text))
    cls = protobuf.message_class(text, "streamhydro.events.Event")
    events = [event(age=float(i)) for i in range(3)]
    values = protobuf.encode(events, cls, schema_id=11, indexes=(1,))
    other = protobuf.encode([{"a": "x"}], protobuf.message_class(text), schema_id=11)[0]
    bad_indexes = schemas.wire_header(11) + b"\x02\x0a" + values[0][7:]
    missing = protobuf.encode([{**events[0], "vip": None}], cls, schema_id=11, indexes=(1,))[0]
    decoded = decode(PayloadSettings(format="protobuf", schema_registry_url=URL), [values[0], other, bad_indexes, missing, values[1], b"\x00\x00\x00\x00", values[2]])
    assert decoded.good.tolist() == [0, 4, 6]
    got = outcomes(decoded)
    assert got == {1: p.MISSING_FEATURE, 2: p.INVALID_PROTOBUF, 3: p.MISSING_FEATURE, 5: p.NOT_WIRE_FORMAT}
    assert_inputs(decoded, events)


def test_protobuf_registry_may_return_a_serialized_descriptor(proto_schema):
    import base64

    pool, main = protobuf.compiled({"schema.proto": proto_schema})
    from google.protobuf import descriptor_pb2

    file_proto = descriptor_pb2.FileDescriptorProto()
    main.CopyToProto(file_proto)
    schemas.remember(URL, 12, schemas.RegisteredSchema("PROTOBUF", base64.b64encode(file_proto.SerializeToString()).decode()))
    values = protobuf.encode([event()], protobuf.message_class(proto_schema), schema_id=12)
    decoded = decode(PayloadSettings(format="protobuf", schema_registry_url=URL), values)
    assert decoded.good.tolist() == [0]
    assert_inputs(decoded, [event()])


def test_protobuf_schema_that_cannot_feed_the_model(tmp_path, proto_schema):
    path = tmp_path / "events.proto"
    path.write_text(proto_schema.replace("optional string city", "optional double city"))
    with pytest.raises(ModelError, match="user.city"):
        make_decoder(MANIFEST, PayloadSettings(format="protobuf", schema=str(path)))
    path.write_text(proto_schema)
    with pytest.raises(ModelError, match="payload.message 'nope.Nope'"):
        make_decoder(MANIFEST, PayloadSettings(format="protobuf", schema=str(path), message="nope.Nope"))
    path.write_text("syntax = 'proto3'; message {")
    with pytest.raises(ModelError, match="does not compile"):
        make_decoder(MANIFEST, PayloadSettings(format="protobuf", schema=str(path)))


# --- the load generator's events --------------------------------------------------------------------


@pytest.mark.parametrize(("payload", "wire"), [("json", False), ("avro", False), ("avro", True), ("protobuf", False), ("protobuf", True)])
def test_generated_events_decode_and_every_bad_kind_is_rejected(tmp_path, payload, wire):
    settings_ = PayloadSettings(format=payload)
    schema_id = None
    if payload != "json":
        text = EventFormat(MANIFEST, payload).schema
        if wire:
            schema_id = 21
            schemas.remember(URL, schema_id, schemas.RegisteredSchema(payload.upper(), text))
            schemas.remember(URL, UNKNOWN_SCHEMA_ID, None)
            settings_ = PayloadSettings(format=payload, schema_registry_url=URL)
        else:
            path = tmp_path / "schema"
            path.write_text(text)
            settings_ = PayloadSettings(format=payload, schema=str(path))
    source = EventFormat(MANIFEST, payload, schema_id)
    values = source.values(50, np.random.default_rng(3))
    decoded = decode(settings_, values)
    assert decoded.good.tolist() == list(range(50))
    assert set(decoded.inputs["city"].ravel()) <= {"red", "green", "blue", "amber"}
    bad = [corrupt(values[i], kind, MANIFEST) for i, kind in enumerate(source.bad_kinds)]
    assert decode(settings_, bad).rejected.rows.tolist() == list(range(len(bad)))


# --- properties -------------------------------------------------------------------------------------

floats32 = st.floats(-(2.0**100), 2.0**100, width=32)
events = st.builds(
    event,
    age=floats32,
    amount=floats32,
    city=st.text(max_size=6),
    vip=st.booleans(),
    items=st.integers(-(2**53), 2**53),
    embedding=st.lists(floats32, min_size=3, max_size=3),
)


def _mangled(good: bytes, data) -> bytes:
    how = data.draw(st.sampled_from(["bytes", "flip", "cut", "append", "splice"]))
    if how == "bytes":
        return data.draw(st.binary(max_size=40))
    if how == "flip" and good:
        at = data.draw(st.integers(0, len(good) - 1))
        return good[:at] + bytes([good[at] ^ data.draw(st.integers(1, 255))]) + good[at + 1 :]
    if how == "cut":
        return good[: data.draw(st.integers(0, max(0, len(good) - 1)))]
    if how == "append":
        return good + data.draw(st.binary(min_size=1, max_size=8))
    return good[: len(good) // 2] + data.draw(st.binary(max_size=8)) + good[len(good) // 2 :]


def _check_batch_against_singles(settings_, encode, data):
    """Every record gets one outcome, the one it gets alone; intact records decode to exactly their values."""
    records = data.draw(st.lists(st.tuples(events, st.booleans()), min_size=1, max_size=12))
    values, intact = [], []
    for e, keep in records:
        good = encode(e)
        values.append(good if keep else _mangled(good, data))
        intact.append(keep)
    for value in values:
        if settings_.schema_registry_url and len(value) >= 5 and value[1:5] != b"\x00\x00\x00\x01":
            schemas.remember(URL, int.from_bytes(value[1:5], "big"), None)  # what the registry answers: 404
    decoder = make_decoder(MANIFEST, settings_)
    batch = decoder.decode(pa.array(values, pa.binary()))
    assert sorted(batch.good.tolist() + batch.rejected.rows.tolist()) == list(range(len(values)))
    for i, value in enumerate(values):
        alone = decoder.decode(pa.array([value], pa.binary()))
        if alone.good.size:
            row = batch.good.tolist().index(i)
            for name, column in alone.inputs.items():
                np.testing.assert_array_equal(batch.inputs[name][row], column[0])
        else:
            assert outcomes(batch)[i] == alone.rejected.error_classes[0]
    good_rows = [i for i, keep in enumerate(intact) if keep]
    assert set(good_rows) <= set(batch.good.tolist())
    positions = [batch.good.tolist().index(i) for i in good_rows]
    expected = expected_inputs([records[i][0] for i in good_rows])
    for name, want in expected.items():
        np.testing.assert_array_equal(batch.inputs[name][positions], want)


@FAST
@given(st.data())
def test_avro_wire_records_never_disturb_their_neighbours(data):
    schema = avro.schema_for(MANIFEST)
    schemas.remember(URL, 1, schemas.RegisteredSchema("AVRO", json.dumps(schema)))
    _check_batch_against_singles(PayloadSettings(format="avro", schema_registry_url=URL), lambda e: avro.encode([e], schema, 1)[0], data)


@FAST
@given(st.data())
def test_protobuf_wire_records_never_disturb_their_neighbours(data):
    text = protobuf.proto_for(MANIFEST)
    schemas.remember(URL, 1, schemas.RegisteredSchema("PROTOBUF", text))
    cls = protobuf.message_class(text)
    _check_batch_against_singles(PayloadSettings(format="protobuf", schema_registry_url=URL), lambda e: protobuf.encode([e], cls, 1)[0], data)


@FAST
@given(st.data())
def test_nested_json_records_never_disturb_their_neighbours(data):
    _check_batch_against_singles(PayloadSettings(), lambda e: json_format.encode([e])[0], data)


@pytest.fixture(scope="module")
def bare_settings(tmp_path_factory):
    work = tmp_path_factory.mktemp("schemas")
    (work / "e.avsc").write_text(json.dumps(avro.schema_for(MANIFEST)))
    (work / "e.proto").write_text(protobuf.proto_for(MANIFEST))
    return {
        "avro": PayloadSettings(format="avro", schema=str(work / "e.avsc")),
        "protobuf": PayloadSettings(format="protobuf", schema=str(work / "e.proto")),
    }


@FAST
@given(st.data())
def test_bare_avro_and_protobuf_records_never_disturb_their_neighbours(bare_settings, data):
    cls = protobuf.message_class(protobuf.proto_for(MANIFEST))
    schema = avro.schema_for(MANIFEST)
    encoders = {"avro": lambda e: avro.encode([e], schema)[0], "protobuf": lambda e: protobuf.encode([e], cls)[0]}
    payload = data.draw(st.sampled_from(sorted(encoders)))
    _check_batch_against_singles(bare_settings[payload], encoders[payload], data)


def test_make_values_keeps_the_demo_models_json():
    from streamhydro.registry import Registry

    manifest = Registry("models").get("breast_cancer").manifest
    values = make_values(manifest, "json", 3, np.random.default_rng(0))
    assert list(json.loads(values[0])) == list(manifest.inputs[0].features)


def test_protobuf_enums_feed_strings_and_proto3_scalars_without_presence_read_as_defaults(tmp_path):
    path = tmp_path / "events.proto"
    path.write_text(
        'syntax = "proto3";\npackage shop;\nenum City { OSLO = 0; BERGEN = 1; }\n'
        "message Order {\n  message User { float age = 1; City city = 2; }\n  User user = 1;\n"
        "  message Tx { double amount = 1; uint64 items = 2; }\n  Tx tx = 2;\n"
        "  message Doc { repeated double embedding = 1; }\n  Doc doc = 3;\n  bool vip = 4;\n}\n"
    )
    cls = protobuf.message_class(path.read_text())
    good = event(age=12.0, city="BERGEN", vip=False, items=2**62)
    values = protobuf.encode([good, {**good, "user": {"age": 0.0, "city": "OSLO"}}, {**good, "doc": None}, {"vip": True}, event(items=2**63, city="OSLO")], cls)
    decoded = decode(PayloadSettings(format="protobuf", schema=str(path)), values)
    assert decoded.good.tolist() == [0, 1]
    assert outcomes(decoded) == {2: p.MISSING_FEATURE, 3: p.MISSING_FEATURE, 4: p.NON_FINITE}
    assert decoded.inputs["city"].ravel().tolist() == ["BERGEN", "OSLO"]
    assert decoded.inputs["count"].dtype == np.int64 and decoded.inputs["num"][1].tolist() == [0.0, 2.5]


def test_the_schema_cache_belongs_to_the_process_that_filled_it(monkeypatch):
    registered = schemas.RegisteredSchema("AVRO", '"long"')
    schemas.remember(URL, 31, registered)
    assert schemas.schema(URL, {}, 31) is registered
    monkeypatch.setattr(schemas, "_owner_pid", -1)  # as in a worker forked from the daemon
    schemas.remember(URL, 32, None)
    assert (URL, 31) not in schemas._schemas and schemas.schema(URL, {}, 32) is None


def test_registry_client_settings_are_typed_and_requests_bounded():
    registry = schemas.client(URL, {"max.retries": "1", "retries.wait.ms": "250"})
    assert (registry._rest_client.max_retries, registry._rest_client.retries_wait_ms) == (1, 250)
    assert registry._rest_client.timeout == schemas.DEFAULT_TIMEOUT_S
    with pytest.raises(SchemaRegistryError, match="refused its settings"):
        schemas.client(URL, {"max.retries": "many"})


def test_a_model_with_string_and_bool_inputs_scores_nested_json_events():
    import onnxruntime as ort

    from _inference_models import Holder, kafka_batch, typed_inputs_model
    from streamhydro.executor import sessions
    from streamhydro.executor.scoring import EngineSettings, ScoringPlan, score_partition

    data, manifest = typed_inputs_model()
    sessions.validate_model(manifest, data, PayloadSettings())
    values = [
        b'{"user":{"age":0.5,"city":"Oslo"},"tx":{"amount":-1},"vip":false}',
        b'{"user":{"age":0.5,"city":7},"tx":{"amount":-1},"vip":false}',
        b'{"user":{"age":2,"city":"Rome"},"tx":{"amount":1},"vip":true}',
    ]
    plan = ScoringPlan(manifest, Holder(data), PayloadSettings(), "preds", "dead", EngineSettings(pipeline_depth=0))
    out = pa.Table.from_batches(list(score_partition(plan, iter([kafka_batch(values)]), resources=sessions.TaskResources())))
    topics = out.column("topic").to_pylist()
    assert topics.count("dead") == 1 and topics.count("preds") == 2
    expected = ort.InferenceSession(data).run(None, {
        "x": np.array([[0.5, -1], [2, 1]], np.float32),
        "city": np.array([["Oslo"], ["Rome"]], dtype=object),
        "vip": np.array([False, True]),
    })[0]
    got = [json.loads(v)["prediction"]["scores"] for v, t in zip(out.column("value").to_pylist(), topics) if t == "preds"]
    np.testing.assert_allclose([[s["a"], s["b"]] for s in got], expected, rtol=1e-6)
