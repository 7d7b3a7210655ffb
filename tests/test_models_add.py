"""``models add`` with real converted models (skl2onnx, onnxmltools, torch.onnx): kind, labels,
mapping, the ZipMap rewrite, the prediction JSON against ONNX Runtime run directly, and refusals.
Pure: no Spark."""

from __future__ import annotations

import json
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

import _converted_models as converted
from _inference_models import kafka_batch
from streamhydro.config import PayloadSettings
from streamhydro.cli import main
from streamhydro.errors import ConfigError, ModelError
from streamhydro.executor.sessions import validate_model
from streamhydro.models_add import add_model
from streamhydro.models_command import input_mapping
from streamhydro.payload.encoding import Encoder
from streamhydro.registry import Manifest, ModelVersion, Registry

pytest.importorskip("skl2onnx")
pytest.importorskip("onnxmltools")


@pytest.fixture
def registry(tmp_path) -> Registry:
    return Registry(tmp_path / "models")


def run_stored(version: ModelVersion, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """ONNX Runtime on the stored model, every manifest output by name."""
    names = [spec.name for spec in version.manifest.outputs]
    session = ort.InferenceSession(version.read_bytes(), providers=["CPUExecutionProvider"])
    return dict(zip(names, session.run(names, inputs)))


def predictions(manifest: Manifest, outputs: dict[str, np.ndarray]) -> list[dict]:
    """The ``prediction`` objects the encoder writes for ``outputs``."""
    n = len(next(iter(outputs.values())))
    out, rejected = Encoder(manifest, "preds", "dead").predictions(kafka_batch([b"{}"] * n), outputs)
    assert rejected.rows.size == 0
    return [json.loads(value)["prediction"] for value in out.column("value").to_pylist()]


def tiny_graph(inputs, outputs, nodes, props: dict[str, str] | None = None) -> bytes:
    graph = helper.make_graph(nodes, "tiny", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for key, value in (props or {}).items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def identity_model(shape, dtype=TensorProto.FLOAT, props=None) -> bytes:
    return tiny_graph(
        [helper.make_tensor_value_info("x", dtype, shape)],
        [helper.make_tensor_value_info("y", dtype, shape)],
        [helper.make_node("Identity", ["x"], ["y"])],
        props,
    )


def test_sklearn_pipeline_zipmap_is_rewritten_into_scores_equal_to_the_original(registry):
    model = converted.sklearn_pipeline()
    version = add_model(registry, model.onnx, "churn")
    m = version.manifest
    assert m.kind == "classifier"
    assert m.labels == ("high", "low", "mid")
    assert [(s.name, s.dtype, s.shape, s.features) for s in m.inputs] == [
        ("city", "string", (-1, 1), ("city",)),
        ("age", "float32", (-1, 1), ("age",)),
        ("amount", "float32", (-1, 1), ("amount",)),
    ]
    assert [(s.name, s.dtype, s.shape) for s in m.outputs] == [("probabilities", "float32", (-1, 3))]
    assert "ZipMap removed" in m.provenance["rewrites"][0]
    assert m.provenance["original_sha256"] != m.sha256
    assert m.provenance["converter"] == {"name": "skl2onnx", "version": onnx.load_from_string(model.onnx).producer_version}
    stored = onnx.load_from_string(version.read_bytes())
    assert "ZipMap" not in {node.op_type for node in stored.graph.node}

    original_labels, original_maps = ort.InferenceSession(model.onnx).run(["output_label", "output_probability"], model.inputs)
    scores = run_stored(version, model.inputs)["probabilities"]
    expected = np.array([[row[label] for label in m.labels] for row in original_maps], np.float32)
    np.testing.assert_array_equal(scores, expected)

    docs = predictions(m, {"probabilities": scores})
    assert [doc["label"] for doc in docs] == list(original_labels)
    for doc, row in zip(docs, expected):
        np.testing.assert_allclose([doc["scores"][label] for label in m.labels], row, rtol=1e-6)


def test_xgboost_classifier_labels_come_from_the_tree_node_and_its_label_output_is_dropped(registry):
    model = converted.xgboost_classifier()
    m = add_model(registry, model.onnx, "trees", labels=["a", "b", "c"]).manifest
    assert (m.kind, m.labels, [o.name for o in m.outputs]) == ("classifier", ("a", "b", "c"), ["probabilities"])
    assert m.provenance["rewrites"] == []
    assert m.inputs[0].field == "input" and m.inputs[0].width == 4
    found = add_model(registry, model.onnx, "trees").manifest
    assert found.labels == ("0", "1", "2")

    labels, probabilities = ort.InferenceSession(model.onnx).run(["label", "probabilities"], model.inputs)
    docs = predictions(found, {"probabilities": probabilities})
    assert [doc["label"] for doc in docs] == [str(label) for label in labels]
    np.testing.assert_allclose([[doc["scores"][k] for k in ("0", "1", "2")] for doc in docs], probabilities, rtol=1e-6)


def test_lightgbm_regressor_is_detected_and_writes_one_value(registry):
    model = converted.lightgbm_regressor()
    version = add_model(registry, model.onnx, "price", mapping={"input": {"features": ["x.a", "x.b", "x.c"]}})
    m = version.manifest
    assert (m.kind, m.labels, m.targets, m.inputs[0].features) == ("regressor", (), (), ("x.a", "x.b", "x.c"))
    outputs = run_stored(version, model.inputs)
    expected = ort.InferenceSession(model.onnx).run(None, model.inputs)[0]
    docs = predictions(m, outputs)
    np.testing.assert_allclose([doc["value"] for doc in docs], expected[:, 0], rtol=1e-6)
    assert set(docs[0]) == {"value"}


def test_torch_model_with_two_outputs_writes_each_under_its_name(registry):
    pytest.importorskip("torch")
    model = converted.torch_two_outputs()
    version = add_model(registry, model.onnx, "ranker", mapping={"x": {"field": "event.vector"}})
    m = version.manifest
    assert m.kind == "outputs" and [(o.name, o.shape) for o in m.outputs] == [("score", (-1, 1)), ("embedding", (-1, 8))]
    assert m.inputs[0].field == "event.vector" and m.provenance["converter"]["name"] == "pytorch"
    score, embedding = ort.InferenceSession(model.onnx).run(["score", "embedding"], model.inputs)
    docs = predictions(m, run_stored(version, model.inputs))
    np.testing.assert_allclose([doc["score"] for doc in docs], score[:, 0], rtol=1e-6)
    np.testing.assert_allclose([doc["embedding"] for doc in docs], embedding, rtol=1e-6)
    with pytest.raises(ModelError, match=r"kind embedding reads one output.*use --kind outputs"):
        add_model(registry, model.onnx, "ranker", kind="embedding")


def test_outputs_of_every_dtype_are_written_as_their_json_type(registry):
    data = tiny_graph(
        [helper.make_tensor_value_info("s", TensorProto.STRING, ["n", 1]),
         helper.make_tensor_value_info("x", TensorProto.DOUBLE, ["n", 2])],
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["n", 1]),
         helper.make_tensor_value_info("positive", TensorProto.BOOL, ["n", 2]),
         helper.make_tensor_value_info("whole", TensorProto.INT64, ["n", 2]),
         helper.make_tensor_value_info("same", TensorProto.DOUBLE, ["n", 2])],
        [helper.make_node("Constant", [], ["zero"], value=helper.make_tensor("zero", TensorProto.DOUBLE, [], [0.0])),
         helper.make_node("Identity", ["s"], ["text"]),
         helper.make_node("Greater", ["x", "zero"], ["positive"]),
         helper.make_node("Cast", ["x"], ["whole"], to=TensorProto.INT64),
         helper.make_node("Identity", ["x"], ["same"])],
    )
    version = add_model(registry, data, "mixed", mapping={"s": {"features": ["doc.text"]}, "x": {"field": "doc.numbers"}})
    m = version.manifest
    assert m.kind == "outputs" and [s.dtype for s in m.inputs] == ["string", "float64"]
    inputs = {"s": np.array([['quote" back\\ \n'], ["ü"]], dtype=object),
              "x": np.array([[1.5, -2.0], [np.nan, np.inf]])}
    docs = predictions(m, run_stored(version, inputs))
    assert docs[0] == {"text": 'quote" back\\ \n', "positive": [True, False], "whole": [1, -2], "same": [1.5, -2.0]}
    assert docs[1]["text"] == "ü" and docs[1]["same"] == [None, None] and docs[1]["positive"] == [False, True]


def test_metadata_props_give_labels_and_features(registry):
    props = {"streamhydro.labels": '["cat", "dog"]', "streamhydro.features.x": '["pet.weight", "pet.height"]'}
    m = add_model(registry, identity_model(["n", 2], props=props), "pets").manifest
    assert (m.kind, m.labels, m.inputs[0].features) == ("classifier", ("cat", "dog"), ("pet.weight", "pet.height"))
    overridden = add_model(registry, identity_model(["n", 2], props=props), "pets", mapping={"x": {"field": "pet.sizes"}})
    assert overridden.manifest.inputs[0].paths == ("pet.sizes",)


def test_a_regressor_with_named_targets(registry):
    m = add_model(registry, identity_model(["n", 2]), "two", kind="regressor", targets=["low", "high"]).manifest
    docs = predictions(m, {"y": np.array([[1.0, np.nan]], np.float32)})
    assert docs == [{"values": {"low": 1.0, "high": None}}]
    unnamed = add_model(registry, identity_model(["n", 2]), "two", kind="regressor").manifest
    assert predictions(unnamed, {"y": np.array([[1.0, 2.5]], np.float32)}) == [{"values": [1.0, 2.5]}]


@pytest.mark.parametrize(
    ("make", "kwargs", "error", "message"),
    [
        (lambda: identity_model(["n", 4]), {}, ModelError, r"cannot tell what output 'y'.*--kind embedding \| regressor"),
        (lambda: identity_model(["n", "k"]), {}, ModelError, r"input 'x' has a dynamic dimension.*re-export with fixed sizes"),
        (lambda: identity_model([1, 4]), {}, ModelError, r"fixed batch size 1.*dynamic first axis"),
        (lambda: identity_model(["n", 2], TensorProto.UINT8), {}, ModelError, r"element type UINT8.*Cast"),
        (lambda: b"not onnx", {}, ModelError, "not an ONNX model"),
        (lambda: identity_model(["n", 2]), {"kind": "classifier"}, ConfigError, r"'--labels'.*pass --labels with 2 names"),
        (lambda: identity_model(["n", 2]), {"kind": "classifier", "labels": ["a"]}, ConfigError, "give exactly 2 labels"),
        (lambda: identity_model(["n", 2]), {"kind": "score"}, ModelError, "kind score needs width 1"),
        (lambda: identity_model(["n", 2]), {"kind": "regressor", "targets": ["a"]}, ConfigError, "'--targets'"),
        (lambda: identity_model(["n", 2]), {"kind": "embedding", "targets": ["a", "b"]}, ConfigError, "drop --targets"),
        (lambda: identity_model(["n", 2]), {"kind": "sorter"}, ConfigError, "'--kind'"),
        (lambda: identity_model(["n", 2]), {"name": "../up"}, ConfigError, r"'--name': '../up' is not a model name"),
        (lambda: identity_model(["n", 2]), {"kind": "embedding", "mapping": {"nope": {"field": "a"}}}, ConfigError,
         r"'inputs.nope'.*has no input 'nope'.*map one of its inputs: x"),
        (lambda: identity_model(["n", 2]), {"kind": "embedding", "mapping": {"x": {"features": ["a"]}}}, ConfigError,
         r"'inputs.x.features'.*1 paths for input 'x' of width 2.*list exactly 2 paths"),
        (lambda: identity_model(["n", 2]), {"kind": "embedding", "mapping": {"x": {"field": "a", "features": ["b"]}}},
         ConfigError, r"'inputs.x'.*exactly one of features"),
        (lambda: identity_model(["n", 2]), {"kind": "embedding", "mapping": {"x": {"field": "a..b"}}}, ConfigError,
         r"'inputs.x.field'.*not a dotted path"),
        (lambda: identity_model(["n", 2], props={"streamhydro.labels": "cat"}), {}, ModelError, "metadata prop 'streamhydro.labels'"),
    ],
)
def test_refusals_name_the_key_and_the_fix(registry, make, kwargs, error, message):
    with pytest.raises(error, match=message):
        add_model(registry, make(), **{"name": "refused", **kwargs})
    assert registry.versions("refused") == []


def test_two_inputs_fed_by_one_path_are_refused(registry):
    with pytest.raises(ConfigError, match=r"'inputs.amount'.*path 'age' already feeds input 'age'"):
        add_model(registry, converted.sklearn_pipeline().onnx, "churn", mapping={"amount": {"features": ["age"]}})


def test_validation_checks_every_output_against_the_graph(registry):
    version = add_model(registry, identity_model(["n", 2]), "m", kind="embedding")
    data, m = version.read_bytes(), version.manifest
    wrong_dtype = Manifest.from_json({**m.to_json(), "outputs": [{"name": "y", "dtype": "float64", "shape": [-1, 2]}]})
    with pytest.raises(ModelError, match=r"output 'y' is tensor\(float\) in the model but float64"):
        validate_model(wrong_dtype, data)
    missing = Manifest.from_json({**m.to_json(), "kind": "outputs", "outputs": [*m.to_json()["outputs"], {"name": "z", "shape": [-1, 1]}]})
    with pytest.raises(ModelError, match="manifest output 'z' is not a model output"):
        validate_model(missing, data)


def models(root, *args: str) -> int:
    return main(["models", "--registry", str(root), *args])


def test_cli_add_prints_the_version_mapping_and_prediction(registry, tmp_path, capsys):
    path = tmp_path / "model.onnx"
    path.write_bytes(converted.sklearn_pipeline().onnx)
    mapping = tmp_path / "mapping.toml"
    mapping.write_text('[inputs.city]\nfeatures = ["user.city"]\n[inputs.age]\nfeatures = ["user.age"]\n')
    code = models(registry.root, "add", str(path), "--name", "churn", "--mapping", str(mapping),
                  "--feature", "age=person.age", "--labels", "h,l,m", "--promote")
    assert code == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("added churn:1 (kind classifier, sha256 ") and out[0].endswith(", promoted)")
    assert out[1:5] == [
        "inputs:",
        "  city    string   [-1, 1]  <- user.city",
        "  age     float32  [-1, 1]  <- person.age",
        "  amount  float32  [-1, 1]  <- amount",
    ]
    assert out[5] == 'prediction (classifier): {"label": "h" | "l" | "m", "scores": {"h": number, "l": number, "m": number}}'
    assert registry.promoted("churn") == 1

    assert models(registry.root, "show", "churn") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["kind"] == "classifier" and shown["checksum"] == "ok"
    assert shown["input_mapping"][0] == "city    string   [-1, 1]  <- user.city"
    assert shown["prediction_schema"].startswith('{"label": "h" | "l" | "m"')


def test_cli_add_refuses_a_malformed_flag(registry, tmp_path, capsys):
    path = tmp_path / "model.onnx"
    path.write_bytes(identity_model(["n", 2]))
    assert models(registry.root, "add", str(path), "--name", "m", "--feature", "x") == 2
    assert "config key '--feature': 'x' is not INPUT=PATH" in capsys.readouterr().err
    assert models(registry.root, "add", str(tmp_path / "missing.onnx"), "--name", "m") == 2
    assert "cannot read" in capsys.readouterr().err


def test_dynamic_output_sizes_are_read_from_a_run_on_zeros(registry):
    data = tiny_graph(
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "w"])],
        [helper.make_node("Identity", ["x"], ["y"])],
    )
    m = add_model(registry, data, "dynamic", kind="embedding").manifest
    assert [(o.name, o.shape) for o in m.outputs] == [("y", (-1, 3))]


def test_cli_add_refuses_a_mapping_file_with_other_tables(registry, tmp_path, capsys):
    path = tmp_path / "model.onnx"
    path.write_bytes(identity_model(["n", 2]))
    mapping = tmp_path / "mapping.toml"
    mapping.write_text('[input.x]\nfield = "a"\n')
    assert models(registry.root, "add", str(path), "--name", "m", "--kind", "embedding", "--mapping", str(mapping)) == 2
    assert "config key '--mapping'" in capsys.readouterr().err and registry.versions("m") == []


paths = st.text(alphabet="ab.x _", max_size=6)
entries = st.one_of(
    st.fixed_dictionaries({"features": st.one_of(st.lists(paths, max_size=3), paths, st.integers())}),
    st.fixed_dictionaries({"field": st.one_of(paths, st.integers(), st.none())}),
    st.dictionaries(st.sampled_from(["features", "field", "fields"]), paths, max_size=2),
    st.lists(paths, max_size=2),
)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.sampled_from(["x", "y", "z"]), entries, max_size=2))
def test_any_mapping_is_applied_or_refused_with_a_config_error(mapping):
    registry = Registry(tempfile.mkdtemp())
    try:
        version = add_model(registry, identity_model(["n", 2]), "m", kind="embedding", mapping=mapping)
    except ConfigError as exc:
        assert exc.key.startswith("inputs.")
        assert registry.versions("m") == []
        return
    spec = version.manifest.inputs[0]
    assert spec.paths == (tuple(mapping["x"]["features"]) if "features" in mapping.get("x", {}) else (mapping.get("x", {}).get("field", "x"),))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(alphabet="xy=,.a ", max_size=8), max_size=3), st.lists(st.text(alphabet="xy=,.a ", max_size=8), max_size=2))
def test_any_feature_and_field_flags_parse_or_are_refused_naming_the_flag(features, fields):
    try:
        mapping = input_mapping(None, features, fields)
    except ConfigError as exc:
        assert exc.key in ("--feature", "--field")
        return
    assert set(mapping) == {flag.partition("=")[0] for flag in features + fields}


def test_sklearn_pipeline_without_zipmap_takes_labels_from_the_classifier_node(registry):
    with_zipmap = add_model(registry, converted.sklearn_pipeline().onnx, "a")
    plain = converted.sklearn_pipeline(zipmap=False)
    version = add_model(registry, plain.onnx, "b")
    m = version.manifest
    assert (m.kind, m.labels, [o.name for o in m.outputs]) == ("classifier", with_zipmap.manifest.labels, ["probabilities"])
    assert m.provenance["rewrites"] == [] and m.sha256 == m.provenance["original_sha256"]
    np.testing.assert_array_equal(run_stored(version, plain.inputs)["probabilities"], run_stored(with_zipmap, plain.inputs)["probabilities"])


def test_scoring_a_task_partition_writes_every_output_of_an_added_model(registry):
    pytest.importorskip("torch")
    from _inference_models import Holder
    from streamhydro.executor.scoring import EngineSettings, ScoringPlan, score_partition

    model = converted.torch_two_outputs()
    version = add_model(registry, model.onnx, "ranker")
    rows = model.inputs["x"]
    values = [json.dumps({"x": row.tolist()}).encode() for row in rows]
    plan = ScoringPlan(version.manifest, Holder(version.read_bytes()), PayloadSettings(), "preds", "dead",
                       EngineSettings(batch_size=16, pipeline_depth=2))
    out = [batch for batch in score_partition(plan, iter([kafka_batch(values)]))]
    docs = [json.loads(v) for batch in out for v in batch.column("value").to_pylist()]
    score, embedding = ort.InferenceSession(model.onnx).run(["score", "embedding"], {"x": rows})
    assert [doc["source"]["offset"] for doc in docs] == list(range(len(rows)))
    np.testing.assert_allclose([doc["prediction"]["score"] for doc in docs], score[:, 0], rtol=1e-6)
    np.testing.assert_allclose([doc["prediction"]["embedding"] for doc in docs], embedding, rtol=1e-6)
