"""Registry: publish, resolve, promote, rollback, checksum. Pure file operations, no Spark."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from streamhydro.errors import ModelError
from streamhydro.registry import (
    MANIFEST_FILE,
    PROMOTED_FILE,
    Manifest,
    Registry,
    TensorSpec,
)


def manifest(name: str = "m", version: int = 0) -> Manifest:
    return Manifest(
        name=name,
        version=version,
        sha256="",
        inputs=(TensorSpec("features", "float32", (-1, 2), features=("a", "b")),),
        outputs=(TensorSpec("scores", "float32", (-1, 2)),),
        labels=("no", "yes"),
        created="2026-01-01T00:00:00+00:00",
        metrics={"validation_accuracy": 0.9},
    )


@pytest.fixture
def registry(tmp_path) -> Registry:
    return Registry(tmp_path / "models")


def test_publish_numbers_versions_and_records_the_checksum(registry):
    first = registry.publish(manifest(), b"one")
    second = registry.publish(manifest(), b"two")
    assert (first.manifest.version, second.manifest.version) == (1, 2)
    assert registry.versions("m") == [1, 2]
    assert registry.get("m", 1).read_bytes() == b"one"
    stored = json.loads((registry.root / "m" / "2" / MANIFEST_FILE).read_text())
    assert stored["sha256"] == second.digest != first.digest
    assert [p.name for p in (registry.root / "m").iterdir() if p.name.startswith(".")] == []


def test_published_version_is_readable_by_other_users(registry):
    registry.publish(manifest(), b"one")
    assert (registry.root / "m" / "1").stat().st_mode & 0o055 == 0o055


def test_a_staging_directory_is_not_a_version(registry):
    registry.publish(manifest(), b"one")
    (registry.root / "m" / ".staging-abc").mkdir()
    assert registry.versions("m") == [1]
    assert registry.resolve("m", "latest") == 1


def test_resolve_latest_promoted_and_pinned(registry):
    for data in (b"1", b"2", b"3"):
        registry.publish(manifest(), data)
    assert registry.resolve("m", "latest") == 3
    assert registry.resolve("m", "promoted") == 3
    registry.promote("m", 2)
    assert registry.resolve("m", "promoted") == 2
    assert registry.resolve("m", 1) == 1
    with pytest.raises(ModelError, match="version '7' not found"):
        registry.resolve("m", 7)


def test_rollback_returns_to_the_previous_promotion(registry):
    for data in (b"1", b"2", b"3"):
        registry.publish(manifest(), data)
    registry.promote("m", 1)
    registry.promote("m", 3)
    registry.promote("m", 3)
    assert registry.promotions("m") == [1, 3]
    assert registry.rollback("m") == 1
    assert registry.resolve("m", "promoted") == 1
    with pytest.raises(ModelError, match="nothing to roll back to"):
        registry.rollback("m")
    assert not list((registry.root / "m").glob(f".{PROMOTED_FILE}*"))


def test_a_single_line_promoted_file_still_reads(registry):
    registry.publish(manifest(), b"1")
    registry.publish(manifest(), b"2")
    (registry.root / "m" / PROMOTED_FILE).write_text("1\n")
    assert registry.promoted("m") == 1


def test_promote_refuses_a_missing_version(registry):
    registry.publish(manifest(), b"1")
    with pytest.raises(ModelError, match="cannot promote version 5"):
        registry.promote("m", 5)


def test_corrupt_model_is_detected_by_checksum(registry):
    version = registry.publish(manifest(), b"good bytes")
    version.path.write_bytes(b"evil bytes")
    with pytest.raises(ModelError, match="checksum mismatch"):
        registry.get("m", "latest").read_bytes()


def test_manifest_that_names_another_version_is_refused(registry):
    registry.publish(manifest(), b"1")
    path = registry.root / "m" / "1" / MANIFEST_FILE
    data = json.loads(path.read_text())
    data["version"] = 9
    path.write_text(json.dumps(data))
    with pytest.raises(ModelError, match="does not match its directory"):
        registry.get("m", 1)


def test_malformed_manifest_is_a_model_error(registry):
    registry.publish(manifest(), b"1")
    (registry.root / "m" / "1" / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ModelError, match="is not JSON"):
        registry.get("m", 1)


def test_directories_without_versions_are_not_models(registry):
    registry.publish(manifest(), b"1")
    (registry.root / "training").mkdir()
    assert registry.models() == ["m"]


def test_a_manifest_without_kind_targets_or_field_still_loads_as_a_classifier():
    stored = json.loads((Path(__file__).parents[1] / "models" / "breast_cancer" / "1" / MANIFEST_FILE).read_text())
    assert not {"kind", "targets"} & set(stored) and "field" not in stored["inputs"][0]
    loaded = Manifest.from_json(stored)
    assert (loaded.kind, loaded.targets, loaded.labels) == ("classifier", (), ("malignant", "benign"))
    assert loaded.inputs[0].paths == tuple(stored["inputs"][0]["features"])
    vector = Manifest.from_json({**stored, "inputs": [{"name": "v", "shape": [-1, 3]}]})
    assert vector.inputs[0].field == "v" and vector.inputs[0].paths == ("v",)


def test_kind_field_and_targets_round_trip():
    made = Manifest(
        name="m", version=1, sha256="", created="2026-01-01T00:00:00+00:00", kind="regressor", labels=(),
        inputs=(TensorSpec("text", "string", (-1, 1), features=("doc.title",)), TensorSpec("vec", "float16", (-1, 4), field="doc.vec")),
        outputs=(TensorSpec("y", "float64", (-1, 2)),), targets=("low", "high"),
    )
    stored = made.to_json()
    assert stored["inputs"][1] == {"name": "vec", "dtype": "float16", "shape": [-1, 4], "field": "doc.vec"}
    assert Manifest.from_json(json.loads(json.dumps(stored))) == made


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"kind": "ranker"}, r"manifest key 'kind' is 'ranker'; use one of classifier"),
        ({"labels": ["no"]}, r"manifest key 'labels': a classifier needs one distinct label per score column"),
        ({"labels": ["no", "no"]}, r"one distinct label per score column"),
        ({"lables": ["no", "yes"]}, r"unknown key\(s\) \['lables'\]"),
        ({"targets": ["a", "b"]}, r"manifest key 'targets' is for kind regressor"),
        ({"kind": "score", "labels": []}, r"kind score needs width 1; 'scores' has 2: use kind embedding or regressor"),
        ({"inputs": [{"name": "f", "dtype": "uint8", "shape": [-1, 1]}]}, r"'f' has dtype 'uint8'; supported: float16"),
        ({"inputs": [{"name": "f", "shape": [-1, 0]}]}, r"must be \[-1, d1, ...\]"),
        ({"inputs": [{"name": "f", "shape": [-1, 2], "features": ["a"]}]}, r"names 1 features but its width"),
        ({"inputs": [{"name": "f", "shape": [-1, 1], "features": ["a"], "field": "b"}]}, r"both features and field"),
        ({"inputs": [{"name": "f", "shape": [-1, 1], "field": "a..b"}]}, r"reads from \['a..b'\]; a path is names joined by dots"),
        ({"inputs": [{"name": "f", "shape": [-1, 1], "field": "a"}, {"name": "g", "shape": [-1, 1], "features": ["a"]}]},
         r"path 'a' feeds both 'f' and 'g'"),
        ({"inputs": [{"name": "f", "shape": [-1, 1], "fields": "a"}]}, r"unknown key\(s\) \['fields'\]"),
        ({"outputs": []}, r"manifest key 'outputs' is empty"),
        ({"labels": "ab"}, r"'labels' must be a list of strings, not 'ab'"),
        ({"inputs": [{"name": "f", "shape": [-1, 1], "features": "a"}]}, r"'features' must be a list of strings"),
    ],
)
def test_malformed_manifests_name_the_key_and_the_fix(change, message):
    with pytest.raises(ModelError, match=message):
        Manifest.from_json({**manifest().to_json(), **change})


def test_publish_refuses_a_manifest_that_fails_its_checks(registry):
    with pytest.raises(ModelError, match="manifest key 'labels'"):
        registry.publish(dataclasses.replace(manifest(), labels=("only",)), b"1")
    assert registry.versions("m") == []
