"""The load generator: well-formed events the decoder accepts, malformed ones it sends to dead letters."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from conftest import client, read_all
from streamhydro.cli import main
from streamhydro.kafka.admin import ensure_topics
from streamhydro.config import PayloadSettings
from streamhydro.payload.formats import make_decoder
from streamhydro.producer import JSON_BAD_KINDS, TENSOR_BAD_KINDS, corrupt, feature_stats, make_values


def test_json_events_carry_every_named_feature(model_registry):
    manifest = model_registry.get("iris_like").manifest
    values = make_values(manifest, "json", 50, np.random.default_rng(0))
    assert {tuple(json.loads(v)) for v in values} == {manifest.inputs[0].features}
    decoded = make_decoder(manifest, PayloadSettings()).decode(pa.array(values, pa.binary()))
    assert len(decoded.rejected.rows) == 0


def test_tensor_events_are_little_endian_float32_rows(model_registry):
    manifest = model_registry.get("iris_like").manifest
    values = make_values(manifest, "tensor", 10, np.random.default_rng(0))
    assert {len(v) for v in values} == {manifest.inputs[0].width * 4}


@pytest.mark.parametrize(("payload", "kinds"), [("json", JSON_BAD_KINDS), ("tensor", TENSOR_BAD_KINDS)])
def test_every_bad_kind_is_rejected_by_the_decoder(model_registry, payload, kinds):
    manifest = model_registry.get("iris_like").manifest
    good = make_values(manifest, payload, len(kinds), np.random.default_rng(1))
    bad = [corrupt(value, kind, manifest) for value, kind in zip(good, kinds)]
    decoded = make_decoder(manifest, PayloadSettings(format=payload)).decode(pa.array(bad, pa.binary()))
    assert len(decoded.rejected.rows) == len(kinds)


def test_feature_stats_come_from_the_trainers_manifest():
    from streamhydro.registry import Registry

    manifest = Registry("models").get("breast_cancer").manifest
    mean, std = feature_stats(manifest)
    assert mean.shape == (30,) and mean[0] == pytest.approx(manifest.provenance["feature_stats"]["mean"][0])
    assert (std > 0).all()


@pytest.mark.broker
def test_produce_command_sends_what_it_prints(kafka_bootstrap, topic_name, model_registry, capsys):
    ensure_topics(client(kafka_bootstrap), {topic_name: 1})
    code = main([
        "produce", "--bootstrap-servers", kafka_bootstrap, "--topic", topic_name, "--count", "500",
        "--bad-fraction", "0.2", "--registry", str(model_registry.root), "--model", "iris_like",
    ])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["sent"] == 500
    assert 50 <= sum(summary["bad"].values()) <= 150

    records = read_all(kafka_bootstrap, topic_name, 500, seconds=30)
    assert len(records) == 500
    assert records[0].key == b"k-0"
    manifest = model_registry.get("iris_like").manifest
    decoded = make_decoder(manifest, PayloadSettings()).decode(pa.array([r.value for r in records], pa.binary()))
    assert len(decoded.rejected.rows) == sum(summary["bad"].values())
