"""The outside checks of the fault benchmark: the reference payload rules, written apart from the service's
decoder, must split events into well-formed and malformed exactly as the service's decoder does."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from streamhydro.harness.audit import _digest, reference_inputs
from streamhydro.config import PayloadSettings
from streamhydro.payload.formats import make_decoder
from streamhydro.producer import JSON_BAD_KINDS, corrupt, make_values
from streamhydro.registry import Registry

MANIFEST = Registry("models").get("breast_cancer", "promoted").manifest
FEATURES = MANIFEST.inputs[0].features


def _document(**changes) -> bytes:
    document = json.loads(make_values(MANIFEST, "json", 1, np.random.default_rng(1))[0])
    document.update(changes)
    return json.dumps(document).encode()


EDGE_CASES = [
    b"\xef\xbb\xbf" + _document(),  # a UTF-8 byte order mark is allowed
    b"  " + _document() + b"\n",  # so is JSON whitespace around the object
    _document(extra={"nested": [1, 2, 3]}),  # other fields are ignored
    _document(**{FEATURES[0]: 3}),  # an integer is a number
    _document(**{FEATURES[0]: True}),  # a boolean is not
    _document(**{FEATURES[0]: None}),
    _document(**{FEATURES[0]: 1e300}),  # a double, but no float32
    _document(**{FEATURES[0]: [1.0]}),
    _document().replace(b"}", b', "%s": 1.0}' % FEATURES[0].encode()),  # a repeated field: the last counts
    _document() + _document(),  # two objects
    _document(**{FEATURES[0]: float("nan")}),  # json.dumps writes NaN, which JSON does not have
    _document(**{FEATURES[0]: float("inf")}),
    b"null",
    b"[1, 2]",
    b'"a string"',
    b"\xff\xfe{}",
]


def test_generated_events_are_well_formed_and_each_bad_kind_is_not():
    for value in make_values(MANIFEST, "json", 200, np.random.default_rng(2)):
        inputs = reference_inputs(value, MANIFEST)
        assert inputs is not None and len(inputs["features"]) == len(FEATURES)
    good = make_values(MANIFEST, "json", 1, np.random.default_rng(3))[0]
    for kind in JSON_BAD_KINDS:
        assert reference_inputs(corrupt(good, kind, MANIFEST), MANIFEST) is None, kind


def test_the_reference_rules_agree_with_the_services_decoder():
    good = make_values(MANIFEST, "json", 20, np.random.default_rng(4))
    values = good + [corrupt(good[0], kind, MANIFEST) for kind in JSON_BAD_KINDS] + EDGE_CASES
    decoded = make_decoder(MANIFEST, PayloadSettings()).decode(pa.array(values, pa.binary()))
    accepted_by_service = set(decoded.good.tolist())
    accepted_by_reference = {i for i, value in enumerate(values) if reference_inputs(value, MANIFEST) is not None}
    assert accepted_by_reference == accepted_by_service


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ((b"k", b"v", [("h", b"1")]), (b"k", b"v", [("h", b"2")])),
        ((b"k", b"v", []), (b"kv", b"", [])),
        ((None, b"v", []), (b"", b"v", [])),
    ],
)
def test_record_digests_tell_records_apart_by_key_value_and_headers(a, b):
    assert _digest(*a) != _digest(*b)
    assert _digest(*a) == _digest(*a)
