"""The model follower refuses a new version that does not fit, naming the input or output, and keeps
serving the old one. Pure: a stand-in for the SparkSession (the follower only broadcasts bytes)."""

from __future__ import annotations

import dataclasses
import json
import types

import pytest
from onnx import TensorProto, helper

from _inference_models import feature_spec, softmax_model
from streamhydro.config import Config
from streamhydro.driver.models import ModelFollower
from streamhydro.models_add import add_model
from streamhydro.registry import MANIFEST_FILE, Registry

FAKE_SPARK = types.SimpleNamespace(
    sparkContext=types.SimpleNamespace(
        broadcast=lambda data: types.SimpleNamespace(value=data, unpersist=lambda blocking=False: None)
    )
)


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def registry(tmp_path) -> Registry:
    registry = Registry(tmp_path / "models")
    data, manifest = softmax_model([feature_spec("x", 4)])
    registry.publish(dataclasses.replace(manifest, name="m", version=0), data)
    return registry


def follow(registry: Registry) -> tuple[ModelFollower, Clock, list]:
    clock, refused = Clock(), []
    config = Config().replace(model={"registry": str(registry.root), "name": "m", "version": "latest", "refresh_seconds": 1})
    follower = ModelFollower(FAKE_SPARK, config, on_refuse=lambda name, version, reason: refused.append((version, reason)), clock=clock)
    return follower, clock, refused


def test_a_version_whose_graph_does_not_fit_its_manifest_is_refused_naming_the_input(registry):
    follower, clock, refused = follow(registry)
    manifest = registry.get("m").manifest
    wider, _ = softmax_model([feature_spec("x", 5)])
    registry.publish(dataclasses.replace(manifest, version=0), wider)
    clock.now = 1
    assert follower.plan.manifest.version == 1
    assert refused == [(2, "input 'x' has shape ['n', 5] in the model but [-1, 4] in the manifest")]


def test_a_version_with_another_output_dtype_is_refused_naming_the_output(registry):
    follower, clock, refused = follow(registry)
    model = helper.make_model(
        helper.make_graph(
            [helper.make_node("Softmax", ["x"], ["y"], axis=1)], "g",
            [helper.make_tensor_value_info("x", TensorProto.DOUBLE, ["n", 3])],
            [helper.make_tensor_value_info("y", TensorProto.DOUBLE, ["n", 3])],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 8
    add_model(registry, model.SerializeToString(), "m", labels=["a", "b", "c"])
    path = registry.root / "m" / "2" / MANIFEST_FILE
    stored = json.loads(path.read_text())
    stored["outputs"][0]["dtype"] = "float32"
    path.write_text(json.dumps(stored))
    clock.now = 1
    assert follower.plan.manifest.version == 1
    assert refused == [(2, "output 'y' is tensor(double) in the model but float32 in the manifest")]
