"""Trainer parts that need neither Spark nor a process group: config, Arrow conversion, batching
order, the master rewrite, checkpoints, ONNX export and its checks."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pytest
import torch

from streamhydro.errors import ConfigError
from streamhydro.trainer.config import from_mapping, load
from streamhydro.trainer.errors import ExportError
from streamhydro.trainer.launch import session_settings
from streamhydro.trainer.model import mlp
from streamhydro.trainer.rank.arrays import partition_arrays
from streamhydro.trainer.rank.checkpoint import RunDirectory
from streamhydro.trainer.rank.export import export_checked, export_onnx
from streamhydro.trainer.rank.loop import _epoch_order

BASE = {"data": {"path": "x.csv", "features": ["a", "b"], "labels": ["no", "yes"]}}


def config(**sections):
    raw = {name: dict(BASE.get(name, {})) for name in ("data", "model", "training", "spark")}
    for name, values in sections.items():
        raw[name].update(values)
    return from_mapping(raw, {})


def test_demo_config_loads():
    demo = load("models/training/breast_cancer.toml", environ={})
    assert (demo.model.name, len(demo.data.features), demo.data.labels) == ("breast_cancer", 30, ("malignant", "benign"))


@pytest.mark.parametrize(
    ("sections", "key"),
    [
        ({"data": {"format": "orc"}}, "data.format"),
        ({"data": {"format": "jdbc", "table": "t", "url": "postgres://x"}}, "data.url"),
        ({"data": {"labels": ["only"]}}, "data.labels"),
        ({"data": {"features": ["a", "label"]}}, "data.features"),
        ({"model": {"hidden": [32, 0]}}, "model.hidden"),
        ({"training": {"ranks": 0}}, "training.ranks"),
        ({"training": {"inject_failure": "1-2"}}, "training.inject_failure"),
        ({"training": {"inject_failure": "4:2"}}, "training.inject_failure"),
        ({"training": {"epoch": 3}}, "training.epoch"),
    ],
)
def test_bad_config_names_the_key(sections, key):
    with pytest.raises(ConfigError) as err:
        config(**sections)
    assert err.value.key == key


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match="did you mean 'training.epochs'"):
        config(training={"epoch": 3})


def test_password_comes_from_the_environment_and_is_not_in_repr():
    raw = {"data": {**BASE["data"], "format": "jdbc", "url": "jdbc:postgresql://h/db", "table": "t", "password": "${PW}"}}
    loaded = from_mapping(raw, {"PW": "hunter2", "STREAMHYDRO_TRAINING_EPOCHS": "4", "STREAMHYDRO_MODEL_HIDDEN": "8,4"})
    assert loaded.data.password == "hunter2"
    assert "hunter2" not in repr(loaded)
    assert "hunter2" not in str(loaded.source_description())
    assert (loaded.training.epochs, loaded.model.hidden) == (4, (8, 4))


def test_unset_environment_variable_is_named():
    raw = {"data": {**BASE["data"], "password": "${NOT_SET_ANYWHERE}"}}
    with pytest.raises(ConfigError, match="NOT_SET_ANYWHERE"):
        from_mapping(raw, {})


def test_jdbc_session_gets_debians_driver_jar():
    pg = config(data={"format": "jdbc", "url": "jdbc:postgresql://h/db", "table": "t"})
    master, conf = session_settings(pg)
    assert conf["spark.jars"] == "/usr/share/java/postgresql.jar"
    assert conf["spark.barrier.sync.timeout"] == "300"
    assert master.url == "local[2,3]"


def test_partition_arrays_splits_holdout_rows():
    batch = pa.RecordBatch.from_pydict(
        {"a": pa.array([1, 2, 3], pa.float32()), "b": pa.array([4, 5, 6], pa.float32()),
         "_label": pa.array([0, 1, 1], pa.int32()), "_holdout": [False, True, False]}
    )
    arrays = partition_arrays(iter([batch, batch.slice(0, 0)]), 2)
    assert arrays.x_train.tolist() == [[1, 4], [3, 6]] and arrays.y_train.tolist() == [0, 1]
    assert arrays.x_holdout.tolist() == [[2, 5]] and arrays.y_holdout.dtype == np.int64


def test_partition_arrays_of_an_empty_partition():
    arrays = partition_arrays(iter([]), 3)
    assert arrays.x_train.shape == (0, 3) and len(arrays.y_holdout) == 0


def test_epoch_order_cycles_a_small_partition_to_the_common_step_count():
    order = _epoch_order(rows=5, needed=12, seed=1, epoch=1, rank=0)
    assert len(order) == 12
    assert sorted(order[:5].tolist()) == list(range(5))
    assert not torch.equal(order, _epoch_order(rows=5, needed=12, seed=1, epoch=2, rank=0))


def test_checkpoints_keep_the_latest_and_attempts_count(tmp_path):
    run = RunDirectory(tmp_path / "run")
    assert run.latest() is None and run.record_attempt() == 0 and run.record_attempt() == 1
    run.save(1, {"model": {"w": torch.ones(2)}})
    run.save(2, {"model": {"w": torch.zeros(2)}})
    assert [p.name for p in (tmp_path / "run").glob("epoch-*")] == ["epoch-0002.pt"]
    assert run.latest()["epoch"] == 2
    run.append_history({"epoch": 1})
    assert run.history() == [{"epoch": 1}]


def test_export_has_a_dynamic_batch_and_softmax_scores():
    torch.manual_seed(0)
    net = mlp([1.0, 2.0, 3.0], [2.0, 2.0, 2.0], [4], 3)
    rows = np.random.default_rng(0).normal(size=(7, 3)).astype(np.float32)
    data, difference = export_checked(net, rows, 1e-5)
    assert difference < 1e-5
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].name == "features" and session.get_inputs()[0].shape[0] == "batch"
    for n in (1, 7):
        (scores,) = session.run(None, {"features": rows[:n]})
        assert scores.shape == (n, 3)
        np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-5)


def test_standardization_is_part_of_the_graph():
    net = mlp([100.0], [10.0], [2], 2)
    session = ort.InferenceSession(export_onnx(net, 1), providers=["CPUExecutionProvider"])
    raw, standardized = np.array([[110.0]], np.float32), torch.tensor([[1.0]])
    with torch.no_grad():
        expected = torch.softmax(net[1:](standardized), dim=1).numpy()
    np.testing.assert_allclose(session.run(None, {"features": raw})[0], expected, rtol=1e-5)


def test_export_refuses_a_disagreement_beyond_tolerance():
    net = mlp([0.0], [1.0], [2], 2)
    with pytest.raises(ExportError, match="disagree"):
        export_checked(net, np.array([[1.0]], np.float32), tolerance=-1.0)
